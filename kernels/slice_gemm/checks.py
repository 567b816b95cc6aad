"""Input checks of slice_gemm with the C++ kernel's messages (csrc/slice_gemm/slice_gemm.cpp),
shared by the Triton launcher and the pure-Python fallback in slimops/ops.py."""
import torch


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise RuntimeError(f"slice_gemm: {msg}")


def _check_index(name, idx, limit, what, X, check_values):
    _check(idx.dim() == 1, f"{name} must be a 1-D tensor of kept {what}, got shape {tuple(idx.shape)}")
    _check(idx.dtype == torch.int64, f"{name} must be int64, got {idx.dtype}; pass {name}.long()")
    _check(idx.device == X.device, f"{name} must be on X's device ({X.device}), got {idx.device}")
    if check_values and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        _check(0 <= lo and hi < limit,
               f"{name} must lie in [0, {limit}) (number of {what}), got values in [{lo}, {hi}]")


def check_inputs(X, W, bias, in_idx, out_idx, in_block, check_values=True):
    """The C++ op's checks, same messages (csrc/slice_gemm/slice_gemm.cpp)."""
    _check(X.dim() == 2, f"X must have shape (T, d_in), got {tuple(X.shape)}; flatten leading dims")
    _check(W.dim() == 2, f"W must have shape (d_out, d_in), got {tuple(W.shape)}")
    _check(X.shape[1] == W.shape[1], f"X has width {X.shape[1]} but W is {W.shape[0]} x {W.shape[1]}")
    _check(X.dtype in (torch.float32, torch.bfloat16, torch.float16),
           f"X must be float32, bfloat16 or float16, got {X.dtype}")
    _check(W.dtype == X.dtype, f"X and W must have the same dtype, got {X.dtype} and {W.dtype}")
    _check(W.device == X.device, f"X and W must be on the same device, got {X.device} and {W.device}")
    _check(in_block >= 1, f"in_block must be >= 1 (head_dim for heads, 1 for channels), got {in_block}")
    if bias is not None:
        _check(tuple(bias.shape) == (W.shape[0],),
               f"bias must have shape (d_out,)=({W.shape[0]},) at full output width, got {tuple(bias.shape)}")
        _check(bias.dtype == X.dtype, f"bias must have X's dtype {X.dtype}, got {bias.dtype}")
        _check(bias.device == X.device, "bias must be on X's device")
    if in_idx is not None:
        _check(X.shape[1] % in_block == 0, f"d_in={X.shape[1]} is not a multiple of in_block={in_block}")
        _check_index("in_idx", in_idx, X.shape[1] // in_block, "input blocks", X, check_values)
    if out_idx is not None:
        _check_index("out_idx", out_idx, W.shape[0], "output rows", X, check_values)
