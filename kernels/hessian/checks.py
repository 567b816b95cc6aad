"""Input checks of hessian_accumulate with the C++ kernel's exact messages
(csrc/hessian/checks.h), shared by the Triton launcher and the pure-Python fallback in
slimops/ops.py."""

import torch

from ..common import check, dtype_name, index_range, sizes

OP = "hessian_accumulate"
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_inputs(H, X, group_ids, check_values=True):
    """check_values=False skips the group-id range check (one device sync on CUDA), for
    callers that validated their ids once."""
    check(
        H.dim() == 3 and H.shape[1] == H.shape[2],
        OP,
        f"H must have shape (G, d, d), got {sizes(H)}",
    )
    check(
        H.dtype == torch.float32,
        OP,
        f"H must be float32 (the accumulator), got {dtype_name(H.dtype)}",
    )
    check(H.is_contiguous(), OP, "H must be contiguous; pass H.contiguous() and keep it")
    check(H.shape[0] >= 1, OP, "H must hold at least one group (G >= 1)")
    check(
        X.dim() == 2,
        OP,
        f"X must have shape (T, d), got {sizes(X)}; flatten leading dims with X.reshape(-1, d)",
    )
    check(
        X.shape[1] == H.shape[1],
        OP,
        f"X has width {X.shape[1]} but H is {H.shape[1]} x {H.shape[2]}",
    )
    check(
        X.dtype in X_DTYPES,
        OP,
        f"X must be float32, bfloat16 or float16, got {dtype_name(X.dtype)}",
    )
    check(X.device == H.device, OP, "H and X must be on the same device")
    if group_ids is None:
        check(
            H.shape[0] == 1,
            OP,
            f"H has G={H.shape[0]} groups but group_ids is None; "
            "pass group_ids (T,) or use H of shape (1, d, d)",
        )
        return
    check(
        group_ids.dim() == 1 and group_ids.shape[0] == X.shape[0],
        OP,
        f"group_ids must have shape (T,)=({X.shape[0]},), got {sizes(group_ids)}",
    )
    check(
        group_ids.dtype == torch.int64,
        OP,
        f"group_ids must be int64, got {dtype_name(group_ids.dtype)}",
    )
    check(group_ids.device == H.device, OP, "group_ids must be on H's device")
    if check_values and group_ids.numel():
        lo, hi = index_range(group_ids)
        check(
            lo >= 0 and hi < H.shape[0],
            OP,
            f"group ids must lie in [0, G={H.shape[0]}), got values in [{lo}, {hi}]",
        )
