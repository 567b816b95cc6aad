"""slimops: structured pruning of Hugging Face LLMs (see README.md; code map: ARCHITECTURE.md)."""

from .checkpoint import load, save_pruned
from .export import export_gguf

__all__ = ["export_gguf", "load", "save_pruned"]

__version__ = "0.1.0"
