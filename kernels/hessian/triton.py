"""Triton kernel of the `hessian` family: grouped Hessian accumulation as a SYRK.

    H[g] += scale * X_g^T X_g        (X_g: the rows of X whose group id is g)

Semantics: kernels/hessian/reference.py (in place, fp32 accumulation, unnormalised).

Design:
  * Lower-triangle tiles only. Program p of grid axis 0 is mapped onto the p-th pair
    (ti >= tj) of BLOCK_D x BLOCK_D tiles, so T*d^2 flops instead of 2*T*d^2; each program
    writes its tile and the mirror, so H stays symmetric without a second pass.
  * Streaming over T: each program loops over its rows BLOCK_K at a time with one fp32
    accumulator tile, so T has no limit and X is never copied or upcast on the host (the
    upcast happens in registers, and on GPU bf16/fp16 go straight into tl.dot with fp32 out).
  * Grouped: rows are sorted by group id once on the host (argsort + counts -> row offsets,
    G+1 int64); grid axis 1 is the group, and a program gathers only its group's rows
    through the sorted row index. X itself is not permuted (no copy of X).
  * fp32 X follows torch's own switch for the reference's matmul: IEEE fp32 products when
    torch.get_float32_matmul_precision() == "highest" (the default), TF32 otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import INTERPRET, check, check_triton_device, on_device
from .checks import OP, check_inputs


def _configs():
    # The interpreter (CPU) computes bf16 tl.dot wrongly and crashes when autotuning several
    # configs (DESIGN.md pitfalls): there X is upcast before the dot (UPCAST) and there is
    # exactly one config, of tiny tiles (it runs each program as numpy ops).
    if INTERPRET:
        return [triton.Config({"BLOCK_D": 32, "BLOCK_K": 32}, num_warps=1, num_stages=1)]
    # Square output tiles (the SYRK pairs i with j); 128x128 keeps the fp32 accumulator at
    # 64 regs/thread with 8 warps, 64x64 wins when d is small (more programs than SMs).
    # Untuned on hardware yet: the autotuner picks per (d, dtype, grouped).
    return [
        triton.Config({"BLOCK_D": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_D": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_D": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_D": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]


CONFIGS = _configs()


# No restore_value: it clones H before every timing trial (4.3 GB for 64 experts at d=4096);
# the launcher tunes on a scratch H instead (_tune_on_scratch).
@triton.autotune(configs=CONFIGS, key=["d", "GATHER", "UPCAST", "PRECISION"])
@triton.jit
def _hessian_syrk_kernel(
    H_ptr,
    X_ptr,
    rows_ptr,
    offsets_ptr,
    T,
    d,
    stride_xt,
    stride_xd,
    scale,
    GATHER: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    # pid -> (ti, tj), ti >= tj, with pid = ti*(ti+1)/2 + tj. The fp32 sqrt can be off by
    # one near perfect squares; the two integer corrections make it exact.
    ti = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) * 0.5).to(tl.int32)
    ti = tl.where((ti + 1) * (ti + 2) // 2 <= pid, ti + 1, ti)
    ti = tl.where(ti * (ti + 1) // 2 > pid, ti - 1, ti)
    tj = pid - ti * (ti + 1) // 2

    if GATHER:  # this group's slice of the sorted row index
        start = tl.load(offsets_ptr + g)
        end = tl.load(offsets_ptr + g + 1)
    else:
        start = 0
        end = T

    offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    in_i = offs_i < d
    in_j = offs_j < d
    col_i = offs_i.to(tl.int64) * stride_xd  # int64: a transposed X view has stride_xd = T
    col_j = offs_j.to(tl.int64) * stride_xd
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        r = k0 + tl.arange(0, BLOCK_K)
        in_r = r < end
        if GATHER:
            src = tl.load(rows_ptr + r, mask=in_r, other=0)
        else:
            src = r
        src = src.to(tl.int64) * stride_xt  # int64: T*d passes 2^31 at d=11008
        # A = X_i^T (BLOCK_D, BLOCK_K) and B = X_j (BLOCK_K, BLOCK_D), zero outside bounds.
        a = tl.load(
            X_ptr + col_i[:, None] + src[None, :], mask=in_i[:, None] & in_r[None, :], other=0.0
        )
        b = tl.load(
            X_ptr + src[:, None] + col_j[None, :], mask=in_r[:, None] & in_j[None, :], other=0.0
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)

    if end > start:  # an empty group leaves its H untouched (bit for bit)
        _store_lower_and_mirror(H_ptr + g * d * d, acc * scale, offs_i, offs_j, d)


@triton.jit
def _store_lower_and_mirror(h_ptr, out, offs_i, offs_j, d):
    """H[i, j] += out for i >= j and H[j, i] += out for i > j: on a diagonal tile only its
    lower half is used, so every update is exactly symmetric whatever the dot's rounding."""
    valid = (offs_i[:, None] < d) & (offs_j[None, :] < d)
    lower = valid & (offs_i[:, None] >= offs_j[None, :])
    p = h_ptr + offs_i[:, None] * d + offs_j[None, :]
    tl.store(p, tl.load(p, mask=lower, other=0.0) + out, mask=lower)
    # Mirror through a transposed tile so the stores stay row-contiguous.
    upper = (offs_j[:, None] < d) & (offs_i[None, :] < d) & (offs_i[None, :] > offs_j[:, None])
    q = h_ptr + offs_j[:, None] * d + offs_i[None, :]
    tl.store(q, tl.load(q, mask=upper, other=0.0) + tl.trans(out), mask=upper)


def _precision(X: torch.Tensor) -> str:
    if X.dtype != torch.float32 and not INTERPRET:
        return "tf32"  # ignored for bf16/fp16 operands: their products are exact in fp32
    return "ieee" if INTERPRET or torch.get_float32_matmul_precision() == "highest" else "tf32"


# Keys the autotuner has already tuned (its own cache is keyed the same way plus dtypes).
_TUNED: set = set()


def _autotunes() -> bool:
    return len(CONFIGS) > 1  # one config (the interpreter): the autotuner runs no trials


def _launch(H, X, rows, offsets, groups, gather, scale):
    T, d = X.shape

    def grid(meta):
        tiles = triton.cdiv(d, meta["BLOCK_D"])
        return (tiles * (tiles + 1) // 2, groups)

    _hessian_syrk_kernel[grid](
        H,
        X,
        rows,
        offsets,
        T,
        d,
        X.stride(0),
        X.stride(1),
        float(scale),
        GATHER=gather,
        UPCAST=INTERPRET,
        PRECISION=_precision(X),
    )


def _tune_on_scratch(X, rows, offsets, gather):
    """Run the autotuner's timing trials (each config several times, each adding into its H)
    on a scratch (1, d, d) H, so the caller's H is then written once, by the chosen config.
    Chosen over restore_value (clones all of H per trial: G*d*d*4 bytes) and over a scratch
    of H's shape (the same G*d*d): one d x d is the least a trial needs. Grouped input is
    tuned as ONE group holding all rows (same flops; 1/G of the programs of the real launch,
    an approximation for MoE). The scratch's values are garbage and never read."""
    d = X.shape[1]
    scratch = torch.empty(1, d, d, device=X.device, dtype=torch.float32)
    if gather:
        offsets = offsets.new_tensor([0, X.shape[0]])
    _launch(scratch, X, rows, offsets, 1, gather, 1.0)


def hessian_accumulate(H, X, group_ids=None, scale=1.0, *, check_indices=True) -> None:
    """In place: H[g] += scale * X[group_ids == g].T @ X[group_ids == g] (Triton SYRK);
    arguments and types as slimops.ops.hessian_accumulate, X already (T, d), any strides.
    check_indices=False skips the group-id range check (a device sync) for trusted ids."""
    check_inputs(H, X, group_ids, check_indices)
    check_triton_device(OP, H)
    G = H.shape[0]
    check(
        group_ids is None or G <= 65535,
        OP,
        f"at most 65535 groups per launch (grid axis 1), got G={G}",
    )
    T, d = X.shape
    if T == 0 or d == 0:
        return
    gather = group_ids is not None and G > 1  # G == 1: every id is 0 (checked), no gather
    if gather:
        rows = torch.sort(group_ids, stable=True).indices  # rows of group g are contiguous
        offsets = torch.zeros(G + 1, dtype=torch.int64, device=H.device)
        torch.cumsum(torch.bincount(group_ids, minlength=G), 0, out=offsets[1:])
    else:
        rows = offsets = X  # unused placeholders (GATHER is a constexpr)
    with on_device(H):
        key = (d, gather, _precision(X), X.dtype)
        if _autotunes() and key not in _TUNED:
            _tune_on_scratch(X, rows, offsets, gather)
            _TUNED.add(key)
        _launch(H, X, rows, offsets, G if gather else 1, gather, scale)
