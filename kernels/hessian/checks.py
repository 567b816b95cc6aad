"""Input checks of hessian_accumulate with the C++ kernel's exact messages
(csrc/hessian/checks.h), shared by the Triton launcher and the pure-Python fallback in
slimops/ops.py."""

import torch

from ..common import check, dtype_name, index_range, sizes

OP = "hessian_accumulate"
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def need(ok: bool, msg: str) -> None:
    check(ok, OP, msg)


def check_inputs(H, X, group_ids, check_values=True):
    """check_values=False skips the group-id range check (one device sync on CUDA), for
    callers that validated their ids once."""
    need(H.dim() == 3 and H.shape[1] == H.shape[2], f"H must have shape (G, d, d), got {sizes(H)}")
    need(
        H.dtype == torch.float32, f"H must be float32 (the accumulator), got {dtype_name(H.dtype)}"
    )
    need(H.is_contiguous(), "H must be contiguous; pass H.contiguous() and keep it")
    need(H.shape[0] >= 1, "H must hold at least one group (G >= 1)")
    need(
        X.dim() == 2,
        f"X must have shape (T, d), got {sizes(X)}; flatten leading dims with X.reshape(-1, d)",
    )
    need(X.shape[1] == H.shape[1], f"X has width {X.shape[1]} but H is {H.shape[1]} x {H.shape[2]}")
    need(X.dtype in X_DTYPES, f"X must be float32, bfloat16 or float16, got {dtype_name(X.dtype)}")
    need(X.device == H.device, "H and X must be on the same device")
    if group_ids is None:
        need(
            H.shape[0] == 1,
            f"H has G={H.shape[0]} groups but group_ids is None; "
            "pass group_ids (T,) or use H of shape (1, d, d)",
        )
        return
    need(
        group_ids.dim() == 1 and group_ids.shape[0] == X.shape[0],
        f"group_ids must have shape (T,)=({X.shape[0]},), got {sizes(group_ids)}",
    )
    need(
        group_ids.dtype == torch.int64,
        f"group_ids must be int64, got {dtype_name(group_ids.dtype)}",
    )
    need(group_ids.device == H.device, "group_ids must be on H's device")
    if check_values and group_ids.numel():
        lo, hi = index_range(group_ids)
        need(
            lo >= 0 and hi < H.shape[0],
            f"group ids must lie in [0, G={H.shape[0]}), got values in [{lo}, {hi}]",
        )
