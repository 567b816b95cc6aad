"""Sheared-LLaMA (Xia et al. 2023): method.py (config, targets and the shape rule, the
pruning-stage objective, `shear`), masks.py (the gate families, the GQA-aware expected
size, the Lagrangian, the final masks) and hard_concrete.py (the L0 gate). Continued
pretraining is slimops.train on slimops.trainer."""

from .method import ShearedConfig, prune

__all__ = ["ShearedConfig", "prune"]
