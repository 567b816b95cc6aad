"""The baselines slimgpt is compared with, one method per file (config + prune): magnitude
(data-free weight norms), wanda_sp (|W| * ||X||), flap (fluctuation, one global threshold,
bias compensation) and taylor (first-order |w * dL/dw|)."""

from . import flap, magnitude, taylor, wanda_sp

__all__ = ["flap", "magnitude", "taylor", "wanda_sp"]
