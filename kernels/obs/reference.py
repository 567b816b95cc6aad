"""Reference for the `obs` family: batched Cholesky scoring and the OBS group update.

Optimal Brain Surgeon for a group S of input columns of a linear layer W (rows = outputs),
with Hinv = H^-1 of the layer's input Hessian (Hassibi & Stork 1993; group form as in
SparseGPT / SlimGPT):

    error(S)  = tr( W[:, S] (Hinv[S, S])^-1 W[:, S]^T )
    W        -= W[:, S] (Hinv[S, S])^-1 Hinv[S, :]          (so W[:, S] becomes 0)
    Hinv     -= Hinv[:, S] (Hinv[S, S])^-1 Hinv[S, :]        (rank-|S| downdate)

The downdate is the Schur complement: on the kept columns R it equals (H[R, R])^-1, so one
downdate replaces a refactorisation of H (about 2*d^2*s flops instead of ~d^3).
"""

import torch


def block_cholesky(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Cholesky of SPD blocks (B, s, s) -> (L, info); info[b] > 0 where block b is
    not positive definite (L is then undefined for that block)."""
    L, info = torch.linalg.cholesky_ex(blocks)
    return L, info


def group_errors(W_blocks: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """OBS error of removing each group, from the Cholesky factor of its Hinv block.

    W_blocks: (B, r, s) = W[:, S_b] for every group b; L: (B, s, s) with L L^T = Hinv[S_b, S_b].
    error_b = tr(W_S (L L^T)^-1 W_S^T) = || L^-1 W_S^T ||_F^2.
    """
    Z = torch.linalg.solve_triangular(L, W_blocks.transpose(1, 2), upper=False)
    return Z.pow(2).sum(dim=(1, 2))


def group_update(W: torch.Tensor, Hinv: torch.Tensor, idx: torch.Tensor) -> None:
    """In place OBS update of W (r, d) and downdate of Hinv (d, d) for removing columns idx.

    After the call W[:, idx] == 0 and Hinv[idx, :] == Hinv[:, idx] == 0, so removed columns
    never score again and repeated updates compose.
    """
    block = Hinv[idx][:, idx]
    L = torch.linalg.cholesky(block)
    rows = Hinv[idx, :]  # (s, d)
    coeff = torch.cholesky_solve(rows, L)  # (Hinv[S,S])^-1 Hinv[S,:]
    W -= W[:, idx] @ coeff
    Hinv -= rows.T @ coeff
    W[:, idx] = 0
    Hinv[idx, :] = 0
    Hinv[:, idx] = 0
