"""Paper-faithful slow SlimGPT numerics: every step recomputes (H[R, R])^-1 from scratch
over the kept columns R and scores groups one at a time with explicit inverses, as the
authors' code does. The fast ObsSolver must pick the same units and give the same weights
(tests/test_slimgpt.py); benchmarks/bench_prune.py times the two against each other.
"""

from __future__ import annotations

import torch


class ReferenceSolver:
    def __init__(self, W: torch.Tensor, H_damped: torch.Tensor):
        self.W, self.H = W, H_damped
        self.alive = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)

    def _hinv(self) -> torch.Tensor:
        R = self.alive.nonzero().squeeze(1)
        Hinv = torch.zeros_like(self.H)
        Hinv[R[:, None], R[None, :]] = torch.linalg.inv(self.H[R][:, R])
        return Hinv

    def errors(self, groups: torch.Tensor) -> torch.Tensor:
        Hinv = self._hinv()
        out = []
        for S in groups:  # one group at a time
            W_S = self.W[:, S]
            out.append(torch.trace(W_S @ torch.linalg.inv(Hinv[S][:, S]) @ W_S.T))
        return torch.stack(out)

    def channel_errors(self) -> torch.Tensor:
        err = self.W.pow(2).sum(0) / torch.diag(self._hinv()).clamp_min(1e-30)
        return err.masked_fill(~self.alive, float("inf"))

    def remove(self, idx: torch.Tensor) -> None:
        Hinv = self._hinv()
        self.W -= self.W[:, idx] @ torch.linalg.inv(Hinv[idx][:, idx]) @ Hinv[idx, :]
        self.W[:, idx] = 0
        self.alive[idx] = False
