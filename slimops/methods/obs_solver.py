"""OBS state for one linear layer: weights W (rows = outputs) and the inverse Hessian of
its inputs, with the two numerics SlimGPT needs: score groups of input columns, and remove
a group while compensating the kept columns.

`ObsSolver` is the fast path: batched Cholesky scoring and the rank-s downdate of Hinv
through slimops.ops. `ReferenceSolver` (methods/slimgpt/reference.py) recomputes the inverse
from H for every step, as the authors' code does. Both expose errors() / channel_errors() /
remove(), so the selection policy in slimgpt/method.py runs unchanged on either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import ops
from ..slicing import head_rows

log = logging.getLogger("slimops")


@dataclass
class Damping:
    value: float  # absolute lambda added to diag(H)
    grown: int  # how many times it was multiplied by 10 to reach positive definiteness


def damp_hessian(
    H: torch.Tensor, W: torch.Tensor, percdamp: float = 0.01, max_grow: int = 6
) -> tuple[torch.Tensor, Damping]:
    """H + lambda*I with lambda = percdamp * mean(diag H), grown x10 until Cholesky succeeds.

    Inputs that never fire (diag 0) get H_ii = 1 and their W columns zeroed (GPTQ's
    treatment): they carry no signal and would make H singular. Modifies W in place.
    """
    if not torch.isfinite(H).all():
        raise FloatingPointError(
            "the layer's Hessian has non-finite entries: the calibration "
            "activations overflowed; use fp32 or check the model"
        )
    if not torch.isfinite(W).all():  # before any OBS algebra turns it into a PD failure
        raise FloatingPointError(
            "the layer's weights have non-finite entries: the checkpoint is corrupt or "
            "overflowed in its dtype; check the model"
        )
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0
    lam = percdamp * torch.diag(H).mean().item()
    for grown in range(max_grow + 1):
        damped = H + lam * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
        _, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            if grown:
                log.warning(
                    "Hessian not positive definite at %.0e damping; grown to %.3g (x10 %d times)",
                    percdamp,
                    lam,
                    grown,
                )
            return damped, Damping(lam, grown)
        lam *= 10.0
    raise FloatingPointError(f"Hessian stays indefinite after damping grew to {lam:.3g}")


def refit(W: torch.Tensor, H: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Least-squares kept columns K: argmin_V E||V x_K - W x||^2 = W H[:, K] H[K, K]^-1 with
    H = E[x x^T] (damped): what OBS's removal of the other columns leaves, in one solve."""
    rhs = W.double() @ H[:, kept].double()
    L = torch.linalg.cholesky(H[kept][:, kept].double())
    return torch.cholesky_solve(rhs.T, L).T.to(W.dtype)


class ObsSolver:
    """Fast path: Hinv kept up to date by rank-s downdates instead of refactorisation."""

    def __init__(self, W: torch.Tensor, H_damped: torch.Tensor):
        self.W = W
        self.H = H_damped
        self.Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H_damped))
        self.alive = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
        self.refactorisations = 0

    def errors(self, groups: torch.Tensor) -> torch.Tensor:
        """OBS error of removing each row of `groups` (B, s) of column indices."""
        return ops.obs_group_errors(self.W, self.Hinv, groups)

    def channel_errors(self) -> torch.Tensor:
        """Single-column errors w_j^2 / Hinv_jj (s = 1 needs no factorisation); inf if gone."""
        err = self.W.pow(2).sum(0) / torch.diag(self.Hinv).clamp_min(1e-30)
        return err.masked_fill(~self.alive, float("inf"))

    def remove(self, idx: torch.Tensor) -> None:
        if ops.obs_group_update(self.W, self.Hinv, idx) != 0:
            # the downdate drifted out of positive definiteness: refactorise the kept part
            self.refactorisations += 1
            log.warning("OBS downdate lost positive definiteness; refactorising H")
            self.Hinv = _inverse_on(self.H, self.alive)
            if ops.obs_group_update(self.W, self.Hinv, idx) != 0:
                raise FloatingPointError("Hinv block not positive definite after refactorising")
        self.alive[idx] = False


def _inverse_on(H: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """(H[R, R])^-1 embedded in a zero d x d matrix, R = alive columns."""
    R = alive.nonzero().squeeze(1)
    Hinv = torch.zeros_like(H)
    sub = H[R][:, R]
    Hinv[R[:, None], R[None, :]] = torch.cholesky_inverse(torch.linalg.cholesky(sub))
    return Hinv


class ObsScorer:
    """Head scores for common.remove_heads: the OBS error of removing a set of heads' o_proj
    input columns, from the solver's current Hinv (rescored after every removal)."""

    def __init__(self, solver, head_dim: int):
        self.solver, self.head_dim, self.device = solver, head_dim, solver.W.device

    def _columns(self, heads: list[int]) -> torch.Tensor:
        return head_rows(heads, self.head_dim, self.device)

    def group_scores(self, groups):
        cols = torch.stack([self._columns(hs) for hs in groups.values()])
        return self.solver.errors(cols).tolist()

    def head_scores(self, heads):
        return self.solver.errors(torch.stack([self._columns([h]) for h in heads])).tolist()

    def joint_score(self, heads):
        return float(self.solver.errors(self._columns(heads)[None])[0])

    def remove(self, heads):
        self.solver.remove(self._columns(heads))
