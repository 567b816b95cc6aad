"""Hard-concrete (L0) gates, as in Louizos et al. 2018 and Sheared-LLaMA (Xia et al. 2023).

A gate z in [0, 1] is a stretched, clamped binary-concrete sample:

    u ~ U(0, 1);  s = sigmoid((ln u - ln(1 - u) + log_alpha) / beta)
    z = clamp(s * (r - l) + l, 0, 1)                       l = -0.1, r = 1.1, beta = 2/3

so z is exactly 0 or exactly 1 with non-zero probability and differentiable in log_alpha in
between. P(z != 0) = sigmoid(log_alpha - beta * ln(-l / r)) is what the expected model size
is computed from. At the end the deterministic score sigmoid(0.8 * log_alpha / beta) (the
official code's "magical number" 0.8) ranks the units; kept units keep that fractional value
and it is folded into the weights.

Initialisation: log_alpha = ln((1 - p) / p) for a drop rate p, plus N(0, 0.01) noise to break
ties. The official code's formula for this is overwritten by a constant mean of 5 (their
issue #3) and log_alpha is clamped to +-ln(100) = +-4.605 after every step, so its masks
effectively start at 4.605; the default p = 0.01 gives ln(99) = 4.595, the same start. A
pretrained model starts with almost every gate open, which is what keeps it working.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LIMIT_L, LIMIT_R, BETA = -0.1, 1.1, 2.0 / 3.0
EPS = 1e-6
MAX_LOG_ALPHA = math.log(100.0)  # the official clamp
SOFT_SHARPNESS = 0.8  # the official deterministic score's factor


class HardConcrete(nn.Module):
    """A tensor of independent hard-concrete gates of the given shape."""

    def __init__(self, shape: tuple[int, ...], droprate_init: float = 0.01, generator=None):
        super().__init__()
        if not 0.0 < droprate_init < 1.0:
            raise ValueError(f"droprate_init {droprate_init} must be in (0, 1)")
        start = math.log(1.0 - droprate_init) - math.log(droprate_init)
        noise = 0.01 * torch.randn(shape, generator=generator)
        self.log_alpha = nn.Parameter((start + noise).clamp(-MAX_LOG_ALPHA, MAX_LOG_ALPHA))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A training sample z (differentiable in log_alpha). The uniform noise is drawn on
        the CPU from `generator`, so every rank of a distributed run draws the same gates."""
        u = torch.rand(self.log_alpha.shape, generator=generator, dtype=torch.float32)
        u = u.clamp(EPS, 1.0 - EPS).to(self.log_alpha.device)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    def keep_prob(self) -> torch.Tensor:
        """P(z != 0) per gate (differentiable): the expected size is built from it."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))

    def score(self) -> torch.Tensor:
        """The deterministic value of each gate: ranks units for the final masks and is the
        value a kept unit folds into the weights."""
        return torch.sigmoid(SOFT_SHARPNESS * self.log_alpha.detach() / BETA)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_alpha.clamp_(-MAX_LOG_ALPHA, MAX_LOG_ALPHA)


def sample_reference(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The paper's formulas written out in float64 (the oracle tests compare against)."""
    la, u = log_alpha.double(), u.double()
    s = 1.0 / (1.0 + torch.exp(-(torch.log(u) - torch.log(1 - u) + la) / BETA))
    return torch.clamp(s * (LIMIT_R - LIMIT_L) + LIMIT_L, 0.0, 1.0)
