"""Reference for the `slice_gemm` family: a GEMM on a structured slice of W, gathered
instead of materialised.

    cols = expand(in_idx, in_block)          # kept input blocks: heads (in_block = head_dim)
                                             # or single channels (in_block = 1)
    Y    = X[:, cols] @ W[out_idx][:, cols]^T (+ bias[out_idx])

X is (T, d_in) at full input width, W is (d_out, d_in); in_idx=None keeps every input column
and out_idx=None every output row. Accumulation is fp32; Y has X's dtype.
"""

import torch


def expand_blocks(in_idx: torch.Tensor, in_block: int) -> torch.Tensor:
    """Column indices of the kept blocks: [b*in_block, ..., b*in_block + in_block - 1] for b."""
    offsets = torch.arange(in_block, device=in_idx.device)
    return (in_idx[:, None] * in_block + offsets).reshape(-1)


def slice_gemm(X, W, bias=None, in_idx=None, out_idx=None, in_block=1) -> torch.Tensor:
    """The oracle: gather, then an fp32 matmul (arguments as slimops.ops.slice_gemm)."""
    Xs, Ws = X.float(), W.float()
    if in_idx is not None:
        cols = expand_blocks(in_idx, in_block)
        Xs, Ws = Xs[:, cols], Ws[:, cols]
    if out_idx is not None:
        Ws = Ws[out_idx]
    Y = Xs @ Ws.T
    if bias is not None:
        Y += (bias if out_idx is None else bias[out_idx]).float()
    return Y.to(X.dtype)
