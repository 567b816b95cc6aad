"""Triton kernel of the `slice_gemm` family: Y = X[:, I] @ W[J][:, I]^T (+ bias[J]).

Semantics: kernels/slice_gemm/reference.py. The slice is never materialised: each program
owns a (BLOCK_M tokens) x (BLOCK_N kept output rows) tile of Y, gathers its W rows through
out_idx once, and walks K over the kept input columns only:

* head mode (in_idx given, in_block with a power-of-two divisor >= 16: head_dim 64, 80, 128):
  every K tile lies inside one kept block, so its columns are one contiguous range of X and
  W; one index load per K tile. sm_90 PTX (compiled here without a GPU): 16-byte cp.async
  into a multi-stage pipeline, wgmma for 128-row tiles. head_dim 80 gets 16-wide K tiles.
* channel mode (in_block without such a divisor, e.g. 1): a K tile of BLOCK_K kept columns
  is gathered element-wise through in_idx; 2-byte gathers cannot use cp.async, so the
  loop prefetches the next tile into registers by hand (see the kernel).
* no in_idx: contiguous K tiles that Triton pipelines itself (cp.async, wgmma).

fp32 accumulation (IEEE products for fp32 inputs, not TF32), bias fused in the epilogue, one
rounding to X's dtype at the store. Decode (T <= 16) and prefill get separate autotune
tables: decode is bound by reading the W slice, so it wants BLOCK_M = 16 (tl.dot's minimum),
narrow N tiles (more programs in flight) and deep pipelines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import INTERPRET, check_triton_device, on_device
from .checks import OP, check_inputs

# Under INTERPRET (no GPU): the interpreter computes bf16 tl.dot wrongly and crashes when
# autotuning several configs (DESIGN.md pitfalls), so the kernel casts to fp32 before the dot
# (CAST_F32) and the autotuners get one config (_INTERP).


@triton.jit
def _tile_ids(T, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row tiles sweep the same W columns together, so a
    W tile is read from HBM once per group instead of once per row tile (L2 reuse)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _mma(acc, a, b, CAST_F32: tl.constexpr, IEEE: tl.constexpr):
    if CAST_F32:  # interpreter only: its bf16 dot is wrong
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:  # fp32 inputs: exact fp32 products, not TF32 (1e-3 relative error)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _kept_cols(IN_IDX, k0, n_cols, IN_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns of kept columns k0 .. k0+BLOCK_K-1 (the k-th kept column is block
    IN_IDX[k // IN_BLOCK], offset k % IN_BLOCK) and which of them exist (k < n_cols)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < n_cols
    blk = tl.load(IN_IDX + offs_k // IN_BLOCK, mask=mask_k, other=0)
    return blk * IN_BLOCK + offs_k % IN_BLOCK, mask_k


@triton.jit
def _load_tiles(x_rows, w_rows, cols, mask_k, mask_m, mask_n, stride_xk, stride_wk):
    """X tile (BLOCK_M, BLOCK_K) and W^T tile (BLOCK_K, BLOCK_N) at the given columns."""
    a = tl.load(
        x_rows + cols[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
    )
    b = tl.load(
        w_rows + cols[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0
    )
    return a, b


@triton.jit
def _slice_gemm_kernel(
    X,
    W,
    B,
    IN_IDX,
    OUT_IDX,
    Y,
    T,
    N_OUT,
    N_BLOCKS,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    M_KEY,
    N_KEY,
    K_KEY,  # autotune buckets only (unused in the body)
    IN_BLOCK: tl.constexpr,
    HEAD_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_IN_IDX: tl.constexpr,
    HAS_OUT_IDX: tl.constexpr,
    CAST_F32: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(T, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < T
    mask_n = offs_n < N_OUT
    if HAS_OUT_IDX:
        rows = tl.load(OUT_IDX + offs_n, mask=mask_n, other=0)
    else:
        rows = offs_n.to(tl.int64)
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = W + rows[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HEAD_K >= 16:
        # One K tile = KT contiguous columns of one kept block; IN_BLOCK // KT tiles a block.
        KT: tl.constexpr = BLOCK_K if BLOCK_K <= HEAD_K else HEAD_K
        TILES: tl.constexpr = IN_BLOCK // KT
        for t in range(0, N_BLOCKS * TILES):
            blk = tl.load(IN_IDX + t // TILES)
            cols = blk * IN_BLOCK + (t % TILES) * KT + tl.arange(0, KT)
            cols = tl.max_contiguous(tl.multiple_of(cols, KT), KT)
            a = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
            b = tl.load(w_rows + cols[:, None] * stride_wk, mask=mask_n[None, :], other=0.0)
            acc = _mma(acc, a, b, CAST_F32, IEEE)
    elif HAS_IN_IDX:
        # Gathered 2-byte columns cannot use cp.async, so Triton's pipeliner leaves them
        # synchronous (seen in the sm_90 PTX): prefetch by hand instead. Each step issues
        # the next tile's data loads and the index loads of the tile after it, then runs this
        # tile's dot, so both latencies overlap the MMA. Prefetches past the end are masked.
        n_cols = N_BLOCKS * IN_BLOCK
        cols, mask_k = _kept_cols(IN_IDX, 0, n_cols, IN_BLOCK, BLOCK_K)
        a, b = _load_tiles(x_rows, w_rows, cols, mask_k, mask_m, mask_n, stride_xk, stride_wk)
        cols, mask_k = _kept_cols(IN_IDX, BLOCK_K, n_cols, IN_BLOCK, BLOCK_K)
        for k0 in range(2 * BLOCK_K, n_cols + 2 * BLOCK_K, BLOCK_K):
            a_next, b_next = _load_tiles(
                x_rows, w_rows, cols, mask_k, mask_m, mask_n, stride_xk, stride_wk
            )
            cols, mask_k = _kept_cols(IN_IDX, k0, n_cols, IN_BLOCK, BLOCK_K)
            acc = _mma(acc, a, b, CAST_F32, IEEE)
            a, b = a_next, b_next
    else:
        # All columns: contiguous tiles that Triton pipelines itself (cp.async, num_stages).
        n_cols = N_BLOCKS
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask_k = cols < n_cols
            a = tl.load(
                x_rows + cols[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            b = tl.load(
                w_rows + cols[:, None] * stride_wk,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = _mma(acc, a, b, CAST_F32, IEEE)

    if HAS_BIAS:
        acc += tl.load(B + rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config(bm, bn, bk, warps, stages):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        num_warps=warps,
        num_stages=stages,
    )


# Candidates, not measurements: no GPU was lent when this was written. Prefill follows the
# usual Hopper bf16 GEMM tiles; decode keeps BLOCK_M at tl.dot's minimum of 16 and varies
# BLOCK_N so that 4096 x 11008 @ 75% (8256 rows) gives 65..258 programs for 132 SMs.
# fmt: off
_PREFILL = [_config(*c) for c in (  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 32, 4, 5),
)]
_DECODE = [_config(*c) for c in (
    (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 64, 4, 5),
    (16, 128, 64, 4, 4), (16, 32, 256, 4, 3),
)]
# fmt: on
_INTERP = [_config(16, 32, 32, 4, 1)]


def _prune(configs, named_args, **kwargs):
    """In head mode BLOCK_K is clipped to HEAD_K in the kernel: drop configs that become
    duplicates, so the autotuner does not time the same kernel twice."""
    head_k = kwargs.get("HEAD_K", 0)
    if head_k < 16:
        return configs
    seen, kept = set(), []
    for cfg in configs:
        kw = dict(cfg.kwargs, BLOCK_K=min(cfg.kwargs["BLOCK_K"], head_k))
        sig = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if sig not in seen:
            seen.add(sig)
            kept.append(cfg)
    return kept


_KEYS = ["M_KEY", "N_KEY", "K_KEY", "IN_BLOCK", "HEAD_K", "HAS_IN_IDX", "HAS_OUT_IDX"]
_PRUNE = {"early_config_prune": _prune}
_TUNED_PREFILL = triton.autotune(
    _INTERP if INTERPRET else _PREFILL, key=_KEYS, prune_configs_by=_PRUNE
)(_slice_gemm_kernel)
_TUNED_DECODE = triton.autotune(
    _INTERP if INTERPRET else _DECODE, key=_KEYS, prune_configs_by=_PRUNE
)(_slice_gemm_kernel)


def _pow2_divisor(n: int, cap: int = 128) -> int:
    """Largest power of two dividing n, at most cap: the widest K tile inside one block."""
    return min(n & -n, cap)


def _bucket(n: int) -> int:
    """Autotune key: next power of two, so candidate masks of similar width share a tuning."""
    return triton.next_power_of_2(max(int(n), 1))


def slice_gemm(X, W, bias=None, in_idx=None, out_idx=None, in_block=1, *, check_indices=True):
    """Y = X[:, I] @ W[J][:, I]^T (+ bias[J]), gathered in the kernel; arguments and types as
    slimops.ops.slice_gemm (the documented contract). check_indices=False skips the index
    range check, which costs a device sync per call: for hot loops that reuse indices already
    checked once."""
    check_inputs(X, W, bias, in_idx, out_idx, in_block, check_indices)
    check_triton_device(OP, X)
    T, d_in = X.shape
    n_out = W.shape[0] if out_idx is None else out_idx.numel()
    Y = torch.empty((T, n_out), dtype=X.dtype, device=X.device)
    if T == 0 or n_out == 0:
        return Y
    n_blocks, block = (d_in, 1) if in_idx is None else (in_idx.numel(), in_block)
    head_k = _pow2_divisor(block) if in_idx is not None else 0
    tuned = _TUNED_DECODE if T <= 16 else _TUNED_PREFILL

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    # The kernel reads bias[row] and the index lists with unit stride: contiguous copies of
    # strided ones (none for the usual contiguous tensors).
    bias, in_idx, out_idx = (None if t is None else t.contiguous() for t in (bias, in_idx, out_idx))
    with on_device(X):
        tuned[grid](
            X,
            W,
            Y if bias is None else bias,
            Y if in_idx is None else in_idx,
            Y if out_idx is None else out_idx,
            Y,
            T,
            n_out,
            n_blocks,
            X.stride(0),
            X.stride(1),
            W.stride(0),
            W.stride(1),
            Y.stride(0),
            Y.stride(1),
            _bucket(T),
            _bucket(n_out),
            _bucket(n_blocks * block),
            IN_BLOCK=block,
            HEAD_K=head_k if head_k >= 16 else 0,
            HAS_BIAS=bias is not None,
            HAS_IN_IDX=in_idx is not None,
            HAS_OUT_IDX=out_idx is not None,
            CAST_F32=INTERPRET and X.dtype != torch.float32,
            IEEE=X.dtype == torch.float32,
        )
    return Y
