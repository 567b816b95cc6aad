// CUDA kernel of the `slice_gemm` family: a tiled GEMM on a structured slice of W.
//
//     cols = expand(in_idx, in_block)       kept input blocks (heads: head_dim, channels: 1)
//     Y    = X[:, cols] @ W[out_idx][:, cols]^T (+ bias[out_idx])
//
// Semantics: kernels/slice_gemm/reference.py. One thread block owns a kBM (tokens) x kBN
// (kept output rows) tile of Y and walks K over the kept columns only, kBK at a time: the
// gather happens on the way into shared memory (row index through out_idx once per block,
// column index through in_idx once per K step and thread), so the slice never exists in
// global memory. fp32 accumulation, bias fused in the epilogue, one rounding at the store.
//
// bf16/fp16: tensor cores through WMMA (m16n16k16, fp32 accumulators; bf16 from sm_80,
// older targets take the SIMT path); fp32: exact fp32 FMAs like the reference. Simple on
// purpose (one shared buffer, synchronous loads; SASS on sm_90: HMMA, no wgmma): the Triton
// kernel is the tuned path, and ops.py dispatches whichever GPU path measures faster.
// Index values are checked on the device (CUDA_KERNEL_ASSERT, as torch's index_select does):
// a host check is a device sync per call, several times a decode-sized GEMM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "../../common/cuda_types.cuh"
#include "../../common/torch_cuda.cuh"
#include "../checks.h"

namespace slimops {
namespace {

constexpr int kBM = 64;          // tokens per tile
constexpr int kBN = 64;          // kept output rows per tile
constexpr int kBK = 32;          // kept input columns per K step (= warp size: one column per lane)
constexpr int kThreads = 128;    // 4 warps; WMMA: each owns a 32x32 quarter of the tile
constexpr int kOutLd = kBN + 4;  // fp32 staging row: +16 bytes against bank conflicts

// Shared row of kBK inputs. 16-bit: +16 bytes (40 halves = 80 B, so 16-row and 16-column
// fragment offsets stay 32-byte aligned for WMMA). fp32: +1 word, so the SIMT loop's
// lanes (rows tx + 16q) hit distinct banks.
template <typename T>
constexpr int kLd = std::is_same_v<T, float> ? kBK + 1 : kBK + 8;

// C[m][n] += sum_k xs[m][k] * ws[n][k] with fp32 FMAs. Thread (ty, tx) owns rows ty + 8r
// and columns tx + 16q: a warp reads 2 rows of xs (broadcasts) and 16 rows of ws.
template <typename T>
struct SimtAcc {
  float c[8][4];
  __device__ void zero() {
#pragma unroll
    for (auto& row : c)
#pragma unroll
      for (float& v : row) v = 0.f;
  }
  __device__ void step(const T (*xs)[kLd<T>], const T (*ws)[kLd<T>]) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      float a[8], b[4];
#pragma unroll
      for (int r = 0; r < 8; ++r) a[r] = to_float(xs[ty + 8 * r][k]);
#pragma unroll
      for (int q = 0; q < 4; ++q) b[q] = to_float(ws[tx + 16 * q][k]);
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) c[r][q] = fmaf(a[r], b[q], c[r][q]);
    }
  }
  __device__ void store(float (*out)[kOutLd]) const {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int q = 0; q < 4; ++q) out[ty + 8 * r][tx + 16 * q] = c[r][q];
  }
};

// Same product on tensor cores: A(m, k) = xs[m][k] row-major, B(k, n) = ws[n][k], i.e. ws
// read column-major; warp w owns the 32x32 quarter (w / 2, w % 2) as 2x2 fragments.
template <typename T>
struct WmmaAcc {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2][2];
  __device__ void zero() {
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < 2; ++n) nvcuda::wmma::fill_fragment(c[m][n], 0.f);
  }
  __device__ void step(const T (*xs)[kLd<T>], const T (*ws)[kLd<T>]) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32, row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
#pragma unroll
    for (int k = 0; k < kBK; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int m = 0; m < 2; ++m) wmma::load_matrix_sync(a[m], &xs[row0 + 16 * m][k], kLd<T>);
#pragma unroll
      for (int n = 0; n < 2; ++n) wmma::load_matrix_sync(b[n], &ws[col0 + 16 * n][k], kLd<T>);
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

struct Args {
  const int64_t* in_idx;          // kept input blocks, or nullptr: all columns
  const int64_t* out_idx;         // kept output rows, or nullptr: all rows
  int64_t tokens, n_out, n_cols;  // rows of X, kept output rows, kept input columns
  int64_t d_in, d_out, in_block;
  int64_t sxm, sxk, swn, swk;  // strides of X and W
};

// Column of W / X holding kept column k, or -1 past the last kept column.
__device__ __forceinline__ int64_t kept_col(const Args& p, int64_t k) {
  if (k >= p.n_cols) return -1;
  if (!p.in_idx) return k;
  const int64_t blk = p.in_idx[k / p.in_block];
  CUDA_KERNEL_ASSERT(blk >= 0 && blk * p.in_block < p.d_in && "slice_gemm: in_idx out of range");
  return blk * p.in_block + k % p.in_block;
}

// tile[r][lane] = src[row(r), col] for r = warp, warp + 4, ...; zero where row or col is -1.
// Lane = K column, so a warp reads 32 kept columns of one row (contiguous when unsliced).
template <typename T, int kRows>
__device__ void load_tile(T (*tile)[kLd<T>], const T* __restrict__ src, const int64_t* rows,
                          int64_t col, int64_t s_row, int64_t s_col) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = warp; r < kRows; r += kThreads / 32) {
    const int64_t row = rows[r];
    tile[r][lane] = (row >= 0 && col >= 0) ? src[row * s_row + col * s_col] : from_float<T>(0.f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    slice_gemm_kernel(T* __restrict__ Y, const T* __restrict__ X, const T* __restrict__ W,
                      const T* __restrict__ bias, const Args p) {
  using Acc = std::conditional_t<kUseWmma<T>, WmmaAcc<T>, SimtAcc<T>>;
  __shared__ __align__(32) T xs[kBM][kLd<T>];
  __shared__ __align__(32) T ws[kBN][kLd<T>];
  __shared__ __align__(32) float out[kBM][kOutLd];
  __shared__ int64_t x_rows[kBM], w_rows[kBN];  // -1: past the end (loads as zero)

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN,
                m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  for (int i = threadIdx.x; i < kBM; i += kThreads) x_rows[i] = m0 + i < p.tokens ? m0 + i : -1;
  for (int i = threadIdx.x; i < kBN; i += kThreads) {
    const int64_t n = n0 + i;
    const int64_t row = n >= p.n_out ? -1 : p.out_idx ? p.out_idx[n] : n;
    CUDA_KERNEL_ASSERT((n >= p.n_out || (row >= 0 && row < p.d_out)) &&
                       "slice_gemm: out_idx out of range");
    w_rows[i] = row;
  }
  __syncthreads();

  Acc acc;
  acc.zero();
  for (int64_t k0 = 0; k0 < p.n_cols; k0 += kBK) {
    const int64_t col = kept_col(p, k0 + threadIdx.x % 32);
    load_tile<T, kBM>(xs, X, x_rows, col, p.sxm, p.sxk);
    load_tile<T, kBN>(ws, W, w_rows, col, p.swn, p.swk);
    __syncthreads();
    acc.step(xs, ws);
    __syncthreads();  // the next step overwrites xs/ws
  }
  acc.store(out);
  __syncthreads();

  // Epilogue: bias of the kept rows, one rounding, row-contiguous stores.
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int r = e / kBN, c = e % kBN;
    if (x_rows[r] < 0 || w_rows[c] < 0) continue;
    const float b = bias ? to_float(bias[w_rows[c]]) : 0.f;
    Y[(m0 + r) * p.n_out + n0 + c] = from_float<T>(out[r][c] + b);
  }
}

// The CPU kernel's checks (csrc/slice_gemm/checks.h) except index values (checked on the
// device: see the header), plus this kernel's own: CUDA tensors, the grid limit.
void check_inputs(const at::Tensor& X, const at::Tensor& W, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& in_idx, const c10::optional<at::Tensor>& out_idx,
                  int64_t in_block) {
  TORCH_CHECK(X.is_cuda() && W.device() == X.device(),
              "slice_gemm: X and W must be on the same CUDA device, got ", X.device(), " and ",
              W.device());
  check_slice_gemm_inputs(X, W, bias, in_idx, out_idx, in_block, /*check_values=*/false);
  TORCH_CHECK((X.size(0) + kBM - 1) / kBM <= 65535, "slice_gemm: at most ", 65535 * kBM,
              " tokens per call (grid.y), got T=", X.size(0), "; split X into chunks");
}

template <typename T>
void launch(at::Tensor& Y, const at::Tensor& X, const at::Tensor& W, const at::Tensor& bias,
            const Args& p) {
  const dim3 grid(static_cast<unsigned>((p.n_out + kBN - 1) / kBN),
                  static_cast<unsigned>((p.tokens + kBM - 1) / kBM));
  const T* b = bias.defined() ? reinterpret_cast<const T*>(bias.const_data_ptr()) : nullptr;
  slice_gemm_kernel<T><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<T*>(Y.data_ptr()), reinterpret_cast<const T*>(X.const_data_ptr()),
      reinterpret_cast<const T*>(W.const_data_ptr()), b, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor slice_gemm_cuda(const at::Tensor& X, const at::Tensor& W,
                           const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& in_idx,
                           const c10::optional<at::Tensor>& out_idx, int64_t in_block) {
  check_inputs(X, W, bias, in_idx, out_idx, in_block);
  const c10::cuda::CUDAGuard guard(X.device());
  // The kernel reads the index lists and the bias with unit stride: contiguous copies of
  // strided ones (none for the usual contiguous tensors).
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor in_c = in_idx ? in_idx->contiguous() : at::Tensor();
  const at::Tensor out_c = out_idx ? out_idx->contiguous() : at::Tensor();
  const bool sliced_in = in_c.defined();
  const Args p{sliced_in ? in_c.const_data_ptr<int64_t>() : nullptr,
               out_c.defined() ? out_c.const_data_ptr<int64_t>() : nullptr,
               X.size(0),
               out_c.defined() ? out_c.numel() : W.size(0),
               sliced_in ? in_c.numel() * in_block : X.size(1),
               X.size(1),
               W.size(0),
               sliced_in ? in_block : 1,
               X.stride(0),
               X.stride(1),
               W.stride(0),
               W.stride(1)};

  at::Tensor Y = at::empty({p.tokens, p.n_out}, X.options());  // contiguous: row stride n_out
  if (p.tokens == 0 || p.n_out == 0) return Y;
  switch (X.scalar_type()) {
    case at::kFloat:
      launch<float>(Y, X, W, bias_c, p);
      break;
    case at::kHalf:
      launch<__half>(Y, X, W, bias_c, p);
      break;
    default:
      launch<__nv_bfloat16>(Y, X, W, bias_c, p);
      break;  // checked above
  }
  return Y;
}

}  // namespace
}  // namespace slimops

TORCH_LIBRARY_IMPL(slimops, CUDA, m) { m.impl("slice_gemm", &slimops::slice_gemm_cuda); }
