"""SlimGPT (Ling et al., NeurIPS 2024): method.py (config, the layer loop, its OBS head and
FFN pruning, the schedules) and reference.py (the slow paper-faithful solver it is tested
against)."""

from .method import SlimGPTConfig, prune

__all__ = ["SlimGPTConfig", "prune"]
