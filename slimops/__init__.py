"""slimops: structured pruning of Hugging Face causal LMs (see DESIGN.md)."""
from .checkpoint import load, save_pruned

__version__ = "0.1.0"
