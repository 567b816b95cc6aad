"""Triton kernels of the `obs` family: batched Cholesky scoring and the group OBS update.

Same contracts as the ops in csrc/ops.cpp (semantics: kernels/obs/reference.py):

    obs_group_errors(W, Hinv, groups) -> (B,) fp32   tr(W_S Hinv[S,S]^-1 W_S^T), +inf if not PD
    obs_group_update(W, Hinv, idx)    -> 0-dim int32 info, in place:
        W    -= W[:,S] Hinv[S,S]^-1 Hinv[S,:]      Hinv -= Hinv[:,S] Hinv[S,S]^-1 Hinv[S,:]

Everything goes through L^-1 with L L^T = Hinv[S,S] (as csrc/obs/obs.cpp does): the error
is ||W_S L^-T||_F^2, and with V = L^-1 Hinv[S,:], U = L^-1 W[:,S]^T the update is
W -= U^T V and Hinv -= V^T V. The d^2*s and r*d*s products run in Triton; the s x s and
s x d glue (gathers, V, U) stays in torch, in fp64 whatever torch's TF32 switch. Hinv is
taken as symmetric (it is SPD by contract): the downdate reads its lower triangle only and
writes both halves, so chained updates keep it exactly symmetric. Matrix products use
input_precision="tf32x3": plain TF32 (Triton's fp32 default) loses ~1e-3 relative per
update, which chained downdates compound; tf32x3 (3 tensor-core passes, ~1e-6) compiles to
HGMMA on sm_90, while "ieee" compiles to FFMA only (ptxas, offline): at d=11008, s=64 the
downdate is ~d^2*s = 7.8 GFLOP against 0.73 GB moved, too close to the FP32 ridge (~20
flop/byte on an H100) for CUDA cores. Register budgets from ptxas for sm_90a (compiled
offline): the tile shapes below have no spills (the s=128 Cholesky spills ~100 B); timings
untuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import check_triton_device, on_device
from .checks import check_errors_inputs, check_update_inputs

# Largest group width factored in registers: one program holds two BLOCK_S^2 fp32 tiles (the
# factor and its inverse): 2 x 64 KB at 128, 64 registers a thread even at 16 warps.
MAX_REGISTER_S = 128
_DOT = tl.constexpr("tf32x3")


@triton.jit
def _obs_block_cholesky_kernel(
    hinv_ptr, groups_ptr, linv_ptr, info_ptr, s, stride_hm, stride_hn, BLOCK_S: tl.constexpr
):
    """Program b: gather Hinv[S_b, S_b], factor it (right-looking Cholesky, column by column),
    invert the factor, store L^-1 (s, s) and info (first non-positive pivot + 1, else 0)."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    valid = offs < s
    rows = offs[:, None]
    cols = offs[None, :]
    inside = valid[:, None] & valid[None, :]
    g = tl.load(groups_ptr + b * s + offs, mask=valid, other=0).to(tl.int64)
    A = tl.load(hinv_ptr + g[:, None] * stride_hm + g[None, :] * stride_hn, mask=inside, other=0.0)
    eye = tl.where(rows == cols, 1.0, 0.0)
    A = tl.where(inside, A, eye)  # identity padding: the pad stays PD and never mixes in
    info = tl.full([], 0, tl.int32)
    for k in range(0, s):
        colk = tl.sum(tl.where(cols == k, A, 0.0), axis=1)
        pivot = tl.sum(tl.where(offs == k, colk, 0.0), axis=0)
        good = pivot > 0.0  # False for NaN pivots too
        info = tl.where((not good) & (info == 0), k + 1, info)
        # keep going on a bad pivot (no early exit in a vectorised loop); the factor is
        # garbage then, and the launcher turns info > 0 into +inf / an untouched update
        # div_rn / sqrt_rn: compiled `/` and tl.sqrt are approximate (the interpreter's are
        # exact); the pivots decide definiteness, so they get IEEE rounding
        lk = tl.where(offs >= k, tl.div_rn(colk, tl.sqrt_rn(tl.where(good, pivot, 1.0))), 0.0)
        A = tl.where((rows > k) & (cols > k), A - lk[:, None] * lk[None, :], A)
        A = tl.where(cols == k, lk[:, None], A)
    L = tl.where(cols <= rows, A, 0.0)
    # X = L^-1 row by row: X[k,:] = (e_k - sum_{j<k} L[k,j] X[j,:]) / L[k,k]; L^T turns
    # row k of L into a column reduction, so no layout conversion runs inside the loop.
    LT = tl.trans(L)
    X = eye
    for k in range(0, s):
        lrow = tl.sum(tl.where(cols == k, LT, 0.0), axis=1)  # L[k, j], indexed by j (rows)
        lkk = tl.sum(tl.where(offs == k, lrow, 0.0), axis=0)
        part = tl.sum(tl.where(rows < k, lrow[:, None] * X, 0.0), axis=0)
        xk = tl.div_rn(tl.where(offs == k, 1.0, 0.0) - part, tl.where(lkk == 0.0, 1.0, lkk))
        X = tl.where(rows == k, xk[None, :], X)
    tl.store(linv_ptr + b * s * s + rows * s + cols, X, mask=inside)
    tl.store(info_ptr + b, info)


@triton.jit
def _obs_group_errors_kernel(
    w_ptr,
    groups_ptr,
    linv_ptr,
    part_ptr,
    r,
    s,
    n_rb,
    stride_wm,
    stride_wn,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (b, rb): sum of squares of rows rb of Y = W[:, S_b] L_b^-T, one partial per
    program (no atomics: the sum stays deterministic)."""
    b = tl.program_id(0)
    rb = tl.program_id(1)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < r
    sq = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, s, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        y = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for j0 in range(0, k0 + BLOCK_K, BLOCK_K):  # L^-1 is lower: Y[:, k] needs j <= k only
            offs_j = j0 + tl.arange(0, BLOCK_K)
            jmask = offs_j < s
            g = tl.load(groups_ptr + b * s + offs_j, mask=jmask, other=0).to(tl.int64)
            w = tl.load(
                w_ptr + offs_r[:, None].to(tl.int64) * stride_wm + g[None, :] * stride_wn,
                mask=rmask[:, None] & jmask[None, :],
                other=0.0,
            )
            lt = tl.load(
                linv_ptr + b * s * s + offs_k[None, :] * s + offs_j[:, None],
                mask=jmask[:, None] & (offs_k < s)[None, :],
                other=0.0,
            )  # L^-T tile
            y += tl.dot(w, lt, input_precision=_DOT)
        sq += y * y
    tl.store(part_ptr + b * n_rb + rb, tl.sum(tl.sum(sq, axis=1), axis=0))


@triton.jit
def _transposed_product(
    a_ptr,
    b_ptr,
    offs_m,
    offs_n,
    mm,
    mn,
    s,
    a_cols,
    b_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile A[:, offs_m]^T B[:, offs_n] over the s rows of A (s, a_cols) and B (s, b_cols),
    both row-major; masked rows/columns read as zeros."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, s, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < s
        at = tl.load(
            a_ptr + offs_k[None, :] * a_cols + offs_m[:, None],
            mask=mk[None, :] & mm[:, None],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k[:, None] * b_cols + offs_n[None, :],
            mask=mk[:, None] & mn[None, :],
            other=0.0,
        )
        acc += tl.dot(at, b, input_precision=_DOT)
    return acc


@triton.jit
def _obs_downdate_kernel(
    hinv_ptr,
    v_ptr,
    removed_ptr,
    d,
    s,
    stride_hm,
    stride_hn,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile (m, n), m >= n, of Hinv -= V^T V, written to (m, n) and mirrored to (n, m);
    rows/cols in S are set to exact zeros in the same pass. Upper tiles exit at once, so
    half the flops and half the Hinv reads of a full GEMM update."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n > pid_m:
        return
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    mm = offs_m < d
    mn = offs_n < d
    acc = _transposed_product(v_ptr, v_ptr, offs_m, offs_n, mm, mn, s, d, d, BLOCK, BLOCK, BLOCK_K)
    om = offs_m[:, None].to(tl.int64)
    on = offs_n[None, :].to(tl.int64)
    inside = mm[:, None] & mn[None, :]
    h = tl.load(hinv_ptr + om * stride_hm + on * stride_hn, mask=inside, other=0.0) - acc
    gone_m = tl.load(removed_ptr + offs_m, mask=mm, other=0) != 0
    gone_n = tl.load(removed_ptr + offs_n, mask=mn, other=0) != 0
    h = tl.where(gone_m[:, None] | gone_n[None, :], 0.0, h)
    if pid_m == pid_n:  # diagonal tile: the lower half wins, so the result is exactly symmetric
        h = tl.where(offs_m[:, None] >= offs_n[None, :], h, tl.trans(h))
    tl.store(hinv_ptr + om * stride_hm + on * stride_hn, h, mask=inside)
    if pid_m != pid_n:
        mirror = offs_n[:, None].to(tl.int64) * stride_hm + offs_m[None, :].to(tl.int64) * stride_hn
        tl.store(hinv_ptr + mirror, tl.trans(h), mask=mn[:, None] & mm[None, :])


@triton.jit
def _obs_weight_update_kernel(
    w_ptr,
    u_ptr,
    v_ptr,
    removed_ptr,
    r,
    d,
    s,
    stride_wm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile of W -= U^T V (U (s, r), V (s, d)); columns in S become exact zeros."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = offs_m < r
    mn = offs_n < d
    acc = _transposed_product(
        u_ptr, v_ptr, offs_m, offs_n, mm, mn, s, r, d, BLOCK_M, BLOCK_N, BLOCK_K
    )
    ptrs = (
        w_ptr + offs_m[:, None].to(tl.int64) * stride_wm + offs_n[None, :].to(tl.int64) * stride_wn
    )
    inside = mm[:, None] & mn[None, :]
    w = tl.load(ptrs, mask=inside, other=0.0) - acc
    gone = tl.load(removed_ptr + offs_n, mask=mn, other=0) != 0
    tl.store(ptrs, tl.where(gone[None, :], 0.0, w), mask=inside)


# --- host side ------------------------------------------------------------------------------


def _dot_block(s: int) -> int:
    # tl.dot needs >= 16 on every side; 64 spills the tf32x3 tiles below (ptxas, sm_90a)
    return max(16, min(32, triton.next_power_of_2(s)))


def block_cholesky_inverse(
    Hinv: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_b^-1 (B, s, s), info (B,) int32) for L_b L_b^T = Hinv[S_b, S_b]; groups (B, s) int64."""
    B, s = groups.shape
    if s > MAX_REGISTER_S:
        # Above 128 one block no longer fits a program's registers (256^2 fp32 = 256 KB, an
        # SM's whole register file); a blocked factorisation would be needed, and for these
        # few large blocks (FFN groups) cuSOLVER's batched potrf is already efficient.
        blocks = Hinv[groups.unsqueeze(2), groups.unsqueeze(1)]
        L, info = torch.linalg.cholesky_ex(blocks)
        eye = torch.eye(s, device=Hinv.device, dtype=Hinv.dtype).expand(B, s, s)
        linv = torch.linalg.solve_triangular(
            L, eye, upper=False
        )  # LAPACK may return it column-major
        return linv.contiguous(), info.to(torch.int32)
    groups = groups.contiguous()
    linv = torch.empty(B, s, s, device=Hinv.device, dtype=torch.float32)
    info = torch.empty(B, device=Hinv.device, dtype=torch.int32)
    block_s = max(16, triton.next_power_of_2(s))
    # 32 fp32 a thread per BLOCK_S^2 tile: ptxas (sm_90a) 117 registers at 64 / 8 warps, and
    # at 128 16 warps spill ~100 B where 8 warps hit 255 registers and spill more
    warps = 4 if block_s <= 32 else (8 if block_s == 64 else 16)
    with on_device(Hinv):
        _obs_block_cholesky_kernel[(B,)](
            Hinv,
            groups,
            linv,
            info,
            s,
            Hinv.stride(0),
            Hinv.stride(1),
            BLOCK_S=block_s,
            num_warps=warps,
        )
    return linv, info


def obs_group_errors(
    W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor, *, check_indices: bool = True
) -> torch.Tensor:
    """OBS error of removing each group (B,) fp32; +inf where Hinv[S_b, S_b] is not PD.
    check_indices=False skips the range check of groups (a device sync) for trusted indices."""
    check_errors_inputs(W, Hinv, groups, check_indices)
    check_triton_device("obs_group_errors", W)
    (B, s), r = groups.shape, W.shape[0]
    if B == 0 or s == 0:
        return torch.zeros(B, device=W.device, dtype=torch.float32)
    groups = groups.contiguous()
    linv, info = block_cholesky_inverse(Hinv, groups)
    block_r = 64
    n_rb = max(1, triton.cdiv(r, block_r))  # r == 0 still gets one (empty) program per group
    part = torch.empty(B, n_rb, device=W.device, dtype=torch.float32)
    with on_device(W):
        _obs_group_errors_kernel[(B, n_rb)](
            W,
            groups,
            linv,
            part,
            r,
            s,
            n_rb,
            W.stride(0),
            W.stride(1),
            BLOCK_R=block_r,
            BLOCK_K=_dot_block(s),
            num_warps=4,
        )
    return part.sum(1).masked_fill_(info > 0, float("inf"))


def _ieee_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp64, rounded once to fp32: immune to torch's TF32 switch (which would leave
    ~1e-3 relative error in V, enough for chained downdates to lose definiteness). These
    are the s x s by s x (d or r) glue products: 2 s^2 (d + r) flops, noise next to the
    d^2 s downdate even at fp64 rates."""
    return (a.double() @ b.double()).float()


def obs_group_update(
    W: torch.Tensor, Hinv: torch.Tensor, idx: torch.Tensor, *, check_indices: bool = True
) -> torch.Tensor:
    """Remove columns idx in place (OBS update of W, rank-s downdate of Hinv); returns a 0-dim
    int32 info, > 0 when Hinv[idx, idx] is not PD, and then W and Hinv are untouched.
    check_indices=False skips the range check of idx (a device sync) for trusted indices."""
    check_update_inputs(W, Hinv, idx, check_indices)
    check_triton_device("obs_group_update", W)
    if idx.numel() == 0:
        return torch.zeros((), device=W.device, dtype=torch.int32)
    linv, info = block_cholesky_inverse(Hinv, idx.view(1, -1))
    info = info.reshape(())
    if int(info) != 0:  # the contract needs the answer on the host before touching anything
        return info
    (r, d), s = W.shape, idx.numel()
    V = _ieee_mm(linv[0], Hinv.index_select(0, idx))  # L^-1 Hinv[S,:]  (s, d)
    U = _ieee_mm(linv[0], W.index_select(1, idx).t())  # L^-1 W[:,S]^T   (s, r)
    removed = torch.zeros(d, device=W.device, dtype=torch.int8).index_fill_(0, idx, 1)
    bk = _dot_block(s)
    # 64 x 64 tiles, 4 warps: 128 x 128 spilled ~1 KB a thread with tf32x3 (ptxas, sm_90a);
    # V (s x d, 2.8 MB at d=11008) stays in L2, so smaller tiles only cost L2 reads.
    nt = triton.cdiv(d, 64)
    with on_device(W):
        _obs_downdate_kernel[(nt, nt)](
            Hinv,
            V,
            removed,
            d,
            s,
            Hinv.stride(0),
            Hinv.stride(1),
            BLOCK=64,
            BLOCK_K=bk,
            num_warps=4,
        )
        if r:
            grid = (triton.cdiv(r, 64), triton.cdiv(d, 64))
            _obs_weight_update_kernel[grid](
                W,
                U,
                V,
                removed,
                r,
                d,
                s,
                W.stride(0),
                W.stride(1),
                BLOCK_M=64,
                BLOCK_N=64,
                BLOCK_K=bk,
                num_warps=4,
            )
    return info
