"""Reference for the `hessian` family: grouped Hessian accumulation.

    H[g] += scale * X_g^T X_g        (X_g: the rows of X whose group id is g)

H is fp32 of shape (G, d, d); X is (T, d) in fp32/bf16/fp16 and is upcast before the
product, so the accumulation is always fp32. The result is unnormalised: callers divide
once at the end. G = 1 with `group_ids=None` is the dense case (one H for q/k/v, one for
gate/up ...); several groups are MoE experts fed by routed rows.
"""

import torch


def hessian_accumulate(
    H: torch.Tensor, X: torch.Tensor, group_ids: torch.Tensor | None = None, scale: float = 1.0
) -> None:
    """In place: H[g] += scale * X[group_ids == g].T @ X[group_ids == g]."""
    X = X.reshape(-1, X.shape[-1]).float()
    if group_ids is None:
        H[0].addmm_(X.T, X, alpha=scale)
        return
    for g in range(H.shape[0]):
        rows = X[group_ids == g]
        H[g].addmm_(rows.T, rows, alpha=scale)
