"""Input checks of obs_group_errors / obs_group_update with the C++ kernels' exact messages
(csrc/obs/checks.h and csrc/obs/obs.cpp), shared by the Triton launchers and the
pure-Python fallbacks in slimops/ops.py."""

import torch

from ..common import check, dtype_name, index_range, sizes


def check_w_hinv(op, W, Hinv):
    check(W.dim() == 2, op, f"W must have shape (r, d), got {sizes(W)}")
    check(
        Hinv.dim() == 2 and Hinv.shape[0] == Hinv.shape[1],
        op,
        f"Hinv must be square (d, d), got {sizes(Hinv)}",
    )
    check(
        W.shape[1] == Hinv.shape[0],
        op,
        f"W has {W.shape[1]} columns but Hinv is {Hinv.shape[0]} x "
        f"{Hinv.shape[1]}; W's columns are Hinv's rows",
    )
    check(
        W.dtype == torch.float32 and Hinv.dtype == torch.float32,
        op,
        f"W and Hinv must be float32, got {dtype_name(W.dtype)} and {dtype_name(Hinv.dtype)}",
    )
    check(W.device == Hinv.device, op, "W and Hinv must be on the same device")


def check_indices(op, name, idx, d, like, check_values=True):
    """int64 column indices on W's device, in [0, d): a bad index would read or write outside
    W / Hinv. check_values=False skips the range (one device sync on CUDA)."""
    check(
        idx.dtype == torch.int64,
        op,
        f"{name} must be int64 column indices, got {dtype_name(idx.dtype)}",
    )
    check(idx.device == like.device, op, f"{name} must be on W's device")
    if check_values and idx.numel():
        lo, hi = index_range(idx)
        check(lo >= 0 and hi < d, op, f"{name} must lie in [0, d={d}), got values in [{lo}, {hi}]")


def check_errors_inputs(W, Hinv, groups, check_values=True):
    op = "obs_group_errors"
    check_w_hinv(op, W, Hinv)
    check(
        groups.dim() == 2,
        op,
        f"groups must have shape (B, s) (one row of column indices per group), got {sizes(groups)}",
    )
    check_indices(op, "groups", groups, Hinv.shape[0], W, check_values)


def check_update_inputs(W, Hinv, idx, check_values=True):
    op = "obs_group_update"
    check_w_hinv(op, W, Hinv)
    check(idx.dim() == 1, op, f"idx must be a 1-D tensor of column indices, got shape {sizes(idx)}")
    check_indices(op, "idx", idx, Hinv.shape[0], W, check_values)
