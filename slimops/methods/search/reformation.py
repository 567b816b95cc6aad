"""Reformation (Search for Efficient LLMs, Sec. 3.3): rebuild each pruned layer of a GIVEN
plan so its outputs match the unpruned layer's on calibration data, layer by layer in the
sequential driver (layer i sees the outputs of reformed layers 0..i-1).

Only o_proj and down_proj lose input columns, so only they are refit, each against
min ||W' X - W X||^2 with W'[:, pruned] = 0 and H = E[x x^T] of its (pruned-model) input:

* "obs" (default): the closed form, one OBS group removal of all pruned columns
  (W' = W - W_S (Hinv_SS)^-1 Hinv_S:, exactly the constrained least-squares solution;
  methods/obs_solver.py);
* "admm": the paper's ADMM (eq. 6-8), with the paper's mask-sign slip fixed (the pruned
  entries are the ones forced to zero) and rho scaled by mean(diag H) so it means the same
  for any calibration size:
      W' <- (W H + rho (Z - U)) (H + rho I)^-1,   Z <- (W' + U) * keep,   U <- U + W' - Z
* "none": the pruned columns are zeroed, nothing refit (the raw mask).
"""

from __future__ import annotations

import torch

from ...plan import PruningPlan
from ...sequential import LayerWork, run_sequential
from ...slicing import head_rows
from ..obs_solver import ObsSolver, damp_hessian

REFORMATIONS = ("obs", "admm", "none")


def admm(
    W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, rho: float = 1.0, iters: int = 30
) -> torch.Tensor:
    """ADMM for min ||(W' - W) X||^2 s.t. W'[:, ~keep] = 0; returns Z (mask exact)."""
    rho = rho * float(H.diagonal().mean())
    A = torch.linalg.cholesky(
        H.double() + rho * torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    )
    WH = W.double() @ H.double()
    mask = keep.to(torch.float64)[None, :]
    Z, U = W.double() * mask, torch.zeros_like(W, dtype=torch.float64)
    for _ in range(iters):
        Wn = torch.cholesky_solve((WH + rho * (Z - U)).T, A).T  # (W H + rho (Z-U)) (H+rho I)^-1
        Z = (Wn + U) * mask
        U = U + Wn - Z
    return Z.to(W.dtype)


def refit_columns(
    W: torch.Tensor,
    H: torch.Tensor,
    drop: torch.Tensor,
    how: str,
    percdamp: float,
    rho: float,
    iters: int,
) -> torch.Tensor:
    """W with columns `drop` removed and the rest refit by `how` (see module docstring)."""
    W = W.float().clone()
    if len(drop) == 0:
        return W
    if how == "none":
        W[:, drop] = 0
        return W
    H, _ = damp_hessian(H, W, percdamp)
    if how == "admm":
        keep = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
        keep[drop] = False
        return admm(W, H, keep, rho, iters)
    solver = ObsSolver(W, H)
    solver.remove(drop.to(W.device))
    return solver.W


@torch.no_grad()
def reform_layer(
    work: LayerWork, lp, how: str, percdamp: float = 0.01, rho: float = 1.0, iters: int = 30
) -> None:
    """Refit one layer's o_proj, then (on inputs after that) down_proj, to the plan `lp`."""
    adapter, layer = work.adapter, work.layer
    if lp.drop_layer:
        work.dropped = True
        return
    nh, _, ffn = adapter.layer_shape(layer)
    drop_heads, drop_channels = lp.removed(nh, ffn)
    for role, drop in (
        ("o", head_rows(drop_heads, adapter.head_dim, work.device)),
        ("down", torch.as_tensor(drop_channels, dtype=torch.long, device=work.device)),
    ):
        linear = adapter.linear(layer, role)
        H = work.hessians({role: linear})[role]
        with work.timer("reformation", work.device):
            linear.weight.copy_(refit_columns(linear.weight, H, drop, how, percdamp, rho, iters))


def reform(
    model,
    adapter,
    tokens: torch.Tensor,
    plan: PruningPlan,
    how: str = "obs",
    percdamp: float = 0.01,
    rho: float = 1.0,
    iters: int = 30,
    **driver,
) -> dict:
    """Reform every layer of `model` in place to `plan` (masked + refit; slice with
    slicing.apply_plan); returns the phase timings. driver: run_sequential's device,
    batch_size, offload (PruneConfig.driver())."""
    if how not in REFORMATIONS:
        raise ValueError(f"reformation {how!r}: choose one of {', '.join(REFORMATIONS)}")
    timer = run_sequential(
        model,
        adapter,
        tokens,
        lambda w: reform_layer(w, plan.layers[w.index], how, percdamp, rho, iters),
        desc=f"search: reformation ({how})",
        **driver,
    )
    return timer.seconds
