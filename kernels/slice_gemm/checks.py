"""Input checks of slice_gemm with the C++ kernels' exact messages
(csrc/slice_gemm/checks.h), shared by the Triton launcher and the pure-Python fallback in
slimops/ops.py."""

import torch

from ..common import check, dtype_name, index_range, sizes

OP = "slice_gemm"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_index(name, idx, limit, what, X, check_values):
    check(idx.dim() == 1, OP, f"{name} must be a 1-D tensor of kept {what}, got shape {sizes(idx)}")
    check(
        idx.dtype == torch.int64,
        OP,
        f"{name} must be int64, got {dtype_name(idx.dtype)}; pass {name}.long()",
    )
    check(
        idx.device == X.device, OP, f"{name} must be on X's device ({X.device}), got {idx.device}"
    )
    if check_values and idx.numel():
        lo, hi = index_range(idx)
        check(
            0 <= lo and hi < limit,
            OP,
            f"{name} must lie in [0, {limit}) (number of {what}), got values in [{lo}, {hi}]",
        )


def check_inputs(X, W, bias, in_idx, out_idx, in_block, check_values=True):
    """check_values=False skips the index range checks (one device sync on CUDA), for hot
    loops that reuse indices checked once per plan."""
    check(
        X.dim() == 2,
        OP,
        f"X must have shape (T, d_in), got {sizes(X)}; "
        "flatten leading dims with X.reshape(-1, d_in)",
    )
    check(W.dim() == 2, OP, f"W must have shape (d_out, d_in), got {sizes(W)}")
    check(
        X.shape[1] == W.shape[1],
        OP,
        f"X has width {X.shape[1]} but W is {W.shape[0]} x {W.shape[1]}; "
        "X must be at full input width (the slice is taken inside the op)",
    )
    check(
        X.dtype in DTYPES, OP, f"X must be float32, bfloat16 or float16, got {dtype_name(X.dtype)}"
    )
    check(
        W.dtype == X.dtype,
        OP,
        f"X and W must have the same dtype, got {dtype_name(X.dtype)} and {dtype_name(W.dtype)}",
    )
    check(
        W.device == X.device,
        OP,
        f"X and W must be on the same device, got {X.device} and {W.device}",
    )
    check(
        in_block >= 1,
        OP,
        f"in_block must be >= 1 (head_dim for heads, 1 for channels), got {in_block}",
    )
    if bias is not None:
        check(
            bias.dim() == 1 and bias.shape[0] == W.shape[0],
            OP,
            f"bias must have shape (d_out,)=({W.shape[0]},) at full output width, "
            f"got {sizes(bias)}",
        )
        check(
            bias.dtype == X.dtype,
            OP,
            f"bias must have X's dtype {dtype_name(X.dtype)}, "
            f"got {dtype_name(bias.dtype)}; pass bias.to(X.dtype)",
        )
        check(bias.device == X.device, OP, "bias must be on X's device")
    if in_idx is not None:
        check(
            X.shape[1] % in_block == 0,
            OP,
            f"d_in={X.shape[1]} is not a multiple of in_block={in_block}; "
            "in_idx counts blocks of in_block columns",
        )
        _check_index("in_idx", in_idx, X.shape[1] // in_block, "input blocks", X, check_values)
    if out_idx is not None:
        _check_index("out_idx", out_idx, W.shape[0], "output rows", X, check_values)
