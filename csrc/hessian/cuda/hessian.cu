// CUDA kernel of the `hessian` family: grouped Hessian accumulation as a tiled SYRK.
//
//     H[g] += scale * X_g^T X_g      (X_g: rows of X whose group id is g)
//
// Semantics: kernels/hessian/reference.py. One thread block owns one lower-triangle pair
// (ti >= tj) of kTile x kTile tiles of one group's H (grid: pairs x groups), streams that
// group's rows through shared memory kRows at a time, accumulates in fp32 and finally adds
// the lower part of its tile to H and mirrors it, so every update is exactly symmetric and
// needs no atomics (no two blocks touch the same H element). Grouped rows come through a
// row index sorted by group once on the host (argsort + counts -> row offsets), so X itself
// is never permuted, copied or upcast in global memory.
//
// bf16/fp16 use tensor cores through WMMA (<mma.h>, m16n16k16, fp32 accumulators): portable
// from sm_75 (bf16 from sm_80; older targets take the SIMT path below). fp32 X uses exact
// fp32 FMAs, matching the reference's fp32 product. Deliberately simple (one shared buffer,
// no cp.async pipelining); the next step on Hopper is an sm_90a version with wgmma fed by
// TMA (cp.async.bulk.tensor) through a 2-3 stage mbarrier pipeline and 128x128 tiles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <type_traits>

#include "../../common/cuda_types.cuh"
#include "../../common/torch_cuda.cuh"
#include "../checks.h"

namespace slimops {
namespace {

constexpr int kTile = 64;          // output tile edge (rows and columns of H)
constexpr int kRows = 32;          // rows of X per shared-memory step (the K of the tile GEMM)
constexpr int kThreads = 128;      // 4 warps: each owns a 32x32 quarter of the tile (WMMA path)
constexpr int kOutLd = kTile + 4;  // fp32 staging row: +16 bytes against bank conflicts

// Shared row length: +16 bytes per row against bank conflicts; keeps every WMMA fragment
// pointer 32-byte aligned (72 halves = 144 B; 16 rows = 2304 B = 72 * 32 B).
template <typename T>
constexpr int kLd = kTile + 16 / static_cast<int>(sizeof(T));

// C[m][n] = sum_k xi[k][m] * xj[k][n] over one kRows step, with plain fp32 FMAs. Thread
// (ty, tx) owns rows ty + 16r and columns tx + 8c: strided so a warp reads distinct banks.
template <typename T>
struct SimtAcc {
  float c[4][8];
  __device__ void zero() {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int q = 0; q < 8; ++q) c[r][q] = 0.f;
  }
  __device__ void step(const T (*xi)[kLd<T>], const T (*xj)[kLd<T>]) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 4
    for (int k = 0; k < kRows; ++k) {
      float a[4], b[8];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = to_float(xi[k][ty + 16 * r]);
#pragma unroll
      for (int q = 0; q < 8; ++q) b[q] = to_float(xj[k][tx + 8 * q]);
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 8; ++q) c[r][q] = fmaf(a[r], b[q], c[r][q]);
    }
  }
  __device__ void store(float (*out)[kOutLd]) const {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int q = 0; q < 8; ++q) out[ty + 16 * r][tx + 8 * q] = c[r][q];
  }
};

// Same product on tensor cores. A = X_i^T is read column-major straight from the row tile
// (A(m, k) = xi[k][m]), B = X_j row-major (B(k, n) = xj[k][n]); warp w owns the 32x32
// quarter (w / 2, w % 2) of the tile as 2x2 fragments.
template <typename T>
struct WmmaAcc {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2][2];
  __device__ void zero() {
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < 2; ++n) nvcuda::wmma::fill_fragment(c[m][n], 0.f);
  }
  __device__ void step(const T (*xi)[kLd<T>], const T (*xj)[kLd<T>]) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32, row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
#pragma unroll
    for (int k = 0; k < kRows; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
      for (int m = 0; m < 2; ++m) wmma::load_matrix_sync(a[m], &xi[k][row0 + 16 * m], kLd<T>);
#pragma unroll
      for (int n = 0; n < 2; ++n) wmma::load_matrix_sync(b[n], &xj[k][col0 + 16 * n], kLd<T>);
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < 2; ++n) wmma::mma_sync(c[m][n], a[m], b[n], c[m][n]);
    }
  }
  __device__ void store(float (*out)[kOutLd]) {
    const int warp = threadIdx.x / 32, row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < 2; ++n)
        nvcuda::wmma::store_matrix_sync(&out[row0 + 16 * m][col0 + 16 * n], c[m][n], kOutLd,
                                        nvcuda::wmma::mem_row_major);
  }
};

// tile[r][c] = X[row(k0 + r), col0 + c], zero outside [k0, end) x [0, d).
template <typename T>
__device__ void load_rows(T (*tile)[kLd<T>], const T* __restrict__ X,
                          const int64_t* __restrict__ rows, int64_t k0, int64_t end, int64_t col0,
                          int64_t d, int64_t stride_t, int64_t stride_d) {
  for (int e = threadIdx.x; e < kRows * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;  // consecutive threads: consecutive columns
    const int64_t row = k0 + r, col = col0 + c;
    T v = from_float<T>(0.f);
    if (row < end && col < d) v = X[(rows ? rows[row] : row) * stride_t + col * stride_d];
    tile[r][c] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    hessian_syrk_kernel(float* __restrict__ H, const T* __restrict__ X,
                        const int64_t* __restrict__ rows, const int64_t* __restrict__ offsets,
                        int64_t T_rows, int64_t d, int64_t stride_t, int64_t stride_d,
                        float scale) {
  using Acc = std::conditional_t<kUseWmma<T>, WmmaAcc<T>, SimtAcc<T>>;
  __shared__ __align__(32) T xi[kRows][kLd<T>];
  __shared__ __align__(32) T xj[kRows][kLd<T>];
  __shared__ __align__(32) float out[kTile][kOutLd];

  const int64_t g = blockIdx.y;
  const int64_t start = offsets ? offsets[g] : 0, end = offsets ? offsets[g + 1] : T_rows;
  if (start >= end) return;  // empty group: H[g] untouched (uniform across the block)

  // blockIdx.x = ti*(ti+1)/2 + tj with ti >= tj; the double sqrt is corrected to exact.
  const int64_t p = blockIdx.x;
  int64_t ti = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(p) + 1.0) - 1.0) / 2.0);
  while ((ti + 1) * (ti + 2) / 2 <= p) ++ti;
  while (ti * (ti + 1) / 2 > p) --ti;
  const int64_t tj = p - ti * (ti + 1) / 2;
  const int64_t i0 = ti * kTile, j0 = tj * kTile;

  Acc acc;
  acc.zero();
  for (int64_t k0 = start; k0 < end; k0 += kRows) {
    load_rows<T>(xi, X, rows, k0, end, i0, d, stride_t, stride_d);
    load_rows<T>(xj, X, rows, k0, end, j0, d, stride_t, stride_d);
    __syncthreads();
    acc.step(xi, xj);
    __syncthreads();  // the next step overwrites xi/xj
  }
  acc.store(out);
  __syncthreads();

  // H[i, j] += out for i >= j (row-contiguous), then H[j, i] += out for i > j, walking the
  // transposed order so those stores are row-contiguous too.
  float* h = H + g * d * d;
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int a = e / kTile, b = e % kTile;
    const int64_t gi = i0 + a, gj = j0 + b;
    if (gi < d && gj < d && gi >= gj) h[gi * d + gj] += scale * out[a][b];
  }
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int b = e / kTile, a = e % kTile;
    const int64_t gi = i0 + a, gj = j0 + b;
    if (gi < d && gj < d && gi > gj) h[gj * d + gi] += scale * out[a][b];
  }
}

// The CPU kernel's checks (csrc/hessian/checks.h), plus this kernel's grid limit.
void check_inputs(const at::Tensor& H, const at::Tensor& X,
                  const c10::optional<at::Tensor>& group_ids) {
  check_hessian_inputs(H, X, group_ids);
  TORCH_CHECK(H.size(0) <= 65535,
              "hessian_accumulate: at most 65535 groups per call (grid.y), got G=", H.size(0));
}

template <typename T>
void launch(const at::Tensor& H, const at::Tensor& X, const int64_t* rows, const int64_t* offsets,
            int64_t groups, double scale) {
  const int64_t d = X.size(1), tiles = (d + kTile - 1) / kTile;
  const dim3 grid(static_cast<unsigned>(tiles * (tiles + 1) / 2), static_cast<unsigned>(groups));
  hessian_syrk_kernel<T><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      H.data_ptr<float>(), reinterpret_cast<const T*>(X.const_data_ptr()), rows, offsets, X.size(0),
      d, X.stride(0), X.stride(1), static_cast<float>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void hessian_accumulate_cuda(const at::Tensor& H, const at::Tensor& X,
                             const c10::optional<at::Tensor>& group_ids, double scale) {
  check_inputs(H, X, group_ids);
  TORCH_CHECK(H.is_cuda(), "hessian_accumulate: the CUDA kernel needs CUDA tensors, got ",
              H.device());
  if (X.size(0) == 0 || X.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(H.device());
  const int64_t G = H.size(0);
  at::Tensor order, offsets;  // undefined: dense (G == 1: all ids are 0, checked)
  if (group_ids && G > 1) {
    order = std::get<1>(at::sort(*group_ids, /*stable=*/true, /*dim=*/0, /*descending=*/false));
    offsets = at::zeros({G + 1}, group_ids->options());
    offsets.narrow(0, 1, G).copy_(at::bincount(*group_ids, {}, G).cumsum(0));
  }
  const int64_t* rows = order.defined() ? order.const_data_ptr<int64_t>() : nullptr;
  const int64_t* offs = offsets.defined() ? offsets.const_data_ptr<int64_t>() : nullptr;
  const int64_t groups = offsets.defined() ? G : 1;
  switch (X.scalar_type()) {
    case at::kFloat:
      launch<float>(H, X, rows, offs, groups, scale);
      break;
    case at::kHalf:
      launch<__half>(H, X, rows, offs, groups, scale);
      break;
    default:
      launch<__nv_bfloat16>(H, X, rows, offs, groups, scale);
      break;  // checked above
  }
}

}  // namespace
}  // namespace slimops

TORCH_LIBRARY_IMPL(slimops, CUDA, m) {
  m.impl("hessian_accumulate", &slimops::hessian_accumulate_cuda);
}
