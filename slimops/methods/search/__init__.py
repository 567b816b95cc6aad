"""Search for Efficient LLMs (Shen et al., NeurIPS 2024): method.py (config, seeds,
evolution, report), space.py (genes, budget, mutation, crossover, repair), fitness.py
(candidates run on the dense weights through slimops.virtual, with prefix reuse) and
reformation.py (refit the winner: OBS closed form or ADMM). The dense saliency pass it
starts from is shared (methods/saliency.py)."""

from .method import SearchConfig, prune

__all__ = ["SearchConfig", "prune"]
