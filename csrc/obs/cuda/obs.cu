// CUDA kernels of the `obs` family: batched Cholesky scoring and the group OBS update.
//
//     error(S) = tr( W[:,S] Hinv[S,S]^-1 W[:,S]^T ) = || W[:,S] L^-T ||_F^2,  L L^T = Hinv[S,S]
//     W       -= U^T V,   Hinv -= V^T V,   V = L^-1 Hinv[S,:],  U = L^-1 W[:,S]^T
//
// Semantics: kernels/obs/reference.py; same contracts and checks as csrc/obs/obs.cpp. Custom
// kernels do what cuBLAS/cuSOLVER do badly: the Cholesky and inverse of many tiny blocks
// (one thread block each, the block in shared memory), and the symmetric downdate fused with
// the zeroing of the removed rows/cols (lower tiles only, mirrored: exact symmetry, half the
// flops, Hinv touched once). The r x s and s x d products go to cuBLAS, in IEEE fp32 whatever
// torch's TF32 switch (ieee_matmul.h).
#include <cuda_runtime.h>

#include <limits>

#include "../../common/torch_cuda.cuh"
#include "../checks.h"
#include "../ieee_matmul.h"

namespace slimops {
namespace {

constexpr int kMaxSharedS = 128;  // s*(s+2) fp32 in shared memory: 66 KB at 128
constexpr int kTile = 64;         // downdate tile (kTile x kTile outputs per thread block)
constexpr int kChunk = 16;        // rows of V staged in shared memory per step
constexpr int kThreads = 256;     // downdate: 16 x 16 threads, 4 x 4 outputs each

// One thread block per group b. A = Hinv[S_b, S_b] in shared memory with row stride s+1 (the
// column walks below then hit distinct banks). Factor A = L L^T in place (right-looking), keep
// diag(L) aside, then solve L X = I, storing X[i][j] (i >= j) at A[j][i] (the upper triangle,
// which the factor does not use). info[b] = first non-positive pivot + 1, else 0.
__global__ void obs_block_cholesky_inverse_kernel(const float* __restrict__ hinv, int64_t stride0,
                                                  int64_t stride1,
                                                  const int64_t* __restrict__ groups, int s,
                                                  float* __restrict__ linv,
                                                  int* __restrict__ info) {
  extern __shared__ float smem[];
  __shared__ int bad;
  const int lda = s + 1, tid = threadIdx.x, nt = blockDim.x;
  float* A = smem;
  float* diag = smem + s * lda;
  const int64_t* g = groups + int64_t(blockIdx.x) * s;
  for (int e = tid; e < s * s; e += nt)
    A[(e / s) * lda + e % s] = hinv[g[e / s] * stride0 + g[e % s] * stride1];
  if (tid == 0) bad = 0;
  __syncthreads();

  for (int k = 0; k < s; ++k) {
    const float pivot = A[k * lda + k];
    if (!(pivot > 0.f)) {  // every thread read the same value after a barrier: a uniform exit
      if (tid == 0) bad = k + 1;
      break;
    }
    const float lkk = sqrtf(pivot);
    __syncthreads();  // all have read the pivot before it is overwritten
    for (int i = k + tid; i < s; i += nt) A[i * lda + k] = (i == k) ? lkk : A[i * lda + k] / lkk;
    if (tid == 0) diag[k] = lkk;
    __syncthreads();
    const int n = s - k - 1;
    for (int e = tid; e < n * n; e += nt) {
      const int i = k + 1 + e / n, j = k + 1 + e % n;
      if (j <= i) A[i * lda + j] -= A[i * lda + k] * A[j * lda + k];
    }
    __syncthreads();
  }
  __syncthreads();
  float* out = linv + int64_t(blockIdx.x) * s * s;
  if (bad) {  // uniform: the launcher masks this group (+inf) or leaves the inputs untouched
    for (int e = tid; e < s * s; e += nt) out[e] = 0.f;
    if (tid == 0) info[blockIdx.x] = bad;
    return;
  }

  for (int e = tid; e < s * s; e += nt) {
    const int i = e / s, j = e % s;
    if (j >= i) A[i * lda + j] = (i == j) ? 1.f : 0.f;  // X = I in the upper triangle
  }
  __syncthreads();
  // Right-looking forward substitution: X[k, :k+1] /= L[k][k]; X[i, :k+1] -= L[i][k] X[k, :k+1].
  for (int k = 0; k < s; ++k) {
    const float inv = 1.f / diag[k];
    for (int j = tid; j <= k; j += nt) A[j * lda + k] *= inv;
    __syncthreads();
    const int rows = s - k - 1, cols = k + 1;
    for (int e = tid; e < rows * cols; e += nt) {
      const int i = k + 1 + e / cols, j = e % cols;
      A[j * lda + i] -= A[i * lda + k] * A[j * lda + k];
    }
    __syncthreads();
  }
  for (int e = tid; e < s * s; e += nt) {
    const int i = e / s, j = e % s;
    out[e] = (i >= j) ? A[j * lda + i] : 0.f;
  }
  if (tid == 0) info[blockIdx.x] = 0;
}

// Tile (tm, tn), tm >= tn, of Hinv -= V^T V (V (s, d) row-major, Hinv (d, d) contiguous),
// written to (tm, tn) and mirrored to (tn, tm); rows/cols with removed[] set become exact
// zeros. Upper tiles exit at once. Diagonal tiles take their lower half on both sides.
__global__ void __launch_bounds__(kThreads)
    obs_downdate_kernel(float* __restrict__ hinv, const float* __restrict__ v,
                        const uint8_t* __restrict__ removed, int64_t d, int s) {
  const int64_t tm = blockIdx.y, tn = blockIdx.x;
  if (tn > tm) return;
  __shared__ float vm[kChunk][kTile];
  __shared__ float vn[kChunk][kTile];
  __shared__ float out[kTile][kTile + 1];  // +1: the transposed reads below hit distinct banks
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = tm * kTile, n0 = tn * kTile;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < s; k0 += kChunk) {
    for (int e = threadIdx.x; e < kChunk * kTile; e += kThreads) {
      const int kk = e / kTile, c = e % kTile;
      const bool in_k = k0 + kk < s;
      vm[kk][c] = (in_k && m0 + c < d) ? v[(k0 + kk) * d + m0 + c] : 0.f;
      vn[kk][c] = (in_k && n0 + c < d) ? v[(k0 + kk) * d + n0 + c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kChunk; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += vm[kk][ty + 16 * i] * vn[kk][tx + 16 * j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = ty + 16 * i, c = tx + 16 * j;
      const int64_t gm = m0 + r, gn = n0 + c;
      const bool keep = gm < d && gn < d && !removed[gm] && !removed[gn];
      out[r][c] = keep ? hinv[gm * d + gn] - acc[i][j] : 0.f;
    }
  __syncthreads();
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    if (m0 + r < d && n0 + c < d)
      hinv[(m0 + r) * d + n0 + c] = (tm == tn && c > r) ? out[c][r] : out[r][c];
    if (tm != tn && n0 + r < d && m0 + c < d) hinv[(n0 + r) * d + m0 + c] = out[c][r];
  }
}

// The one check this kernel adds to the CPU kernels' (csrc/obs/checks.h): CUDA tensors.
void check_cuda_w_hinv(const char* op, const at::Tensor& W, const at::Tensor& Hinv) {
  TORCH_CHECK(W.is_cuda() && W.device() == Hinv.device(), op,
              ": W and Hinv must be on the same CUDA device");
}

// (L_b^-1 (B, s, s) contiguous, info (B,) int32) for L_b L_b^T = Hinv[S_b, S_b].
std::tuple<at::Tensor, at::Tensor> block_cholesky_inverse(const at::Tensor& Hinv,
                                                          const at::Tensor& groups) {
  const int64_t B = groups.size(0), s = groups.size(1);
  if (s > kMaxSharedS) {
    // 256 x 258 fp32 = 264 KB: more than an SM's shared memory. These few large blocks (FFN
    // groups) are what cuSOLVER's batched potrf handles well.
    const at::Tensor blocks =
        at::take(Hinv, groups.unsqueeze(2) * Hinv.size(1) + groups.unsqueeze(1));
    auto [L, info] = at::linalg_cholesky_ex(blocks);
    const at::Tensor eye = at::eye(s, L.options()).expand({B, s, s});
    return {at::linalg_solve_triangular(L, eye, /*upper=*/false).contiguous(), info};
  }
  const at::Tensor g = groups.contiguous();
  at::Tensor linv = at::empty({B, s, s}, Hinv.options());
  at::Tensor info = at::empty({B}, Hinv.options().dtype(at::kInt));
  const size_t smem = size_t(s) * size_t(s + 2) * sizeof(float);
  if (smem > 48 * 1024) {  // above 48 KB a kernel must opt in to dynamic shared memory
    C10_CUDA_CHECK(cudaFuncSetAttribute(obs_block_cholesky_inverse_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  const int threads = s > 32 ? 256 : 64;
  obs_block_cholesky_inverse_kernel<<<B, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      Hinv.data_ptr<float>(), Hinv.stride(0), Hinv.stride(1), g.data_ptr<int64_t>(), int(s),
      linv.data_ptr<float>(), info.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {linv, info};
}

at::Tensor obs_group_errors_cuda(const at::Tensor& W, const at::Tensor& Hinv,
                                 const at::Tensor& groups) {
  check_cuda_w_hinv("obs_group_errors", W, Hinv);
  check_errors_inputs(W, Hinv, groups);
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t B = groups.size(0), s = groups.size(1), r = W.size(0);
  if (B == 0 || s == 0) return at::zeros({B}, W.options());

  auto [linv, info] = block_cholesky_inverse(Hinv, groups);
  const at::Tensor Ws = W.index_select(1, groups.reshape({-1})).view({r, B, s}).permute({1, 0, 2});
  const at::Tensor Z = ieee_matmul(Ws, linv.transpose(1, 2));  // W_S L^-T  (B, r, s), cuBLAS
  at::Tensor err = Z.square().sum({1, 2});
  return err.masked_fill_(info > 0, std::numeric_limits<float>::infinity());
}

void downdate(const at::Tensor& Hinv, const at::Tensor& V, const at::Tensor& idx) {
  const int64_t d = Hinv.size(0), s = V.size(0);
  const int64_t tiles = (d + kTile - 1) / kTile;
  if (!Hinv.is_contiguous() || tiles > 65535) {  // the fused kernel wants rows of stride d
    ieee_sub_matmul_(Hinv, V.t(), V);
    Hinv.index_fill_(0, idx, 0.0);
    Hinv.index_fill_(1, idx, 0.0);
    return;
  }
  const at::Tensor removed = at::zeros({d}, Hinv.options().dtype(at::kByte)).index_fill_(0, idx, 1);
  const at::Tensor Vc = V.contiguous();
  const dim3 grid{unsigned(tiles), unsigned(tiles)};
  obs_downdate_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      Hinv.data_ptr<float>(), Vc.data_ptr<float>(), removed.data_ptr<uint8_t>(), d, int(s));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor obs_group_update_cuda(const at::Tensor& W, const at::Tensor& Hinv,
                                 const at::Tensor& idx) {
  check_cuda_w_hinv("obs_group_update", W, Hinv);
  check_update_inputs(W, Hinv, idx);
  const c10::cuda::CUDAGuard guard(W.device());
  if (idx.numel() == 0) return at::zeros({}, W.options().dtype(at::kInt));

  auto [linv, info] = block_cholesky_inverse(Hinv, idx.unsqueeze(0));
  at::Tensor info0 = info.reshape({});
  // Not PD: leave W and Hinv untouched so the caller can refactorise with more damping.
  if (info0.item<int32_t>() != 0) return info0;
  const at::Tensor Linv = linv.select(0, 0);
  const at::Tensor V = ieee_matmul(Linv, Hinv.index_select(0, idx));   // L^-1 Hinv[S,:]  (s, d)
  const at::Tensor U = ieee_matmul(Linv, W.index_select(1, idx).t());  // L^-1 W[:,S]^T   (s, r)
  ieee_sub_matmul_(W, U.t(), V);
  W.index_fill_(1, idx, 0.0);  // exact zeros: removed columns never score again
  downdate(Hinv, V, idx);
  return info0;
}

}  // namespace
}  // namespace slimops

TORCH_LIBRARY_IMPL(slimops, CUDA, m) {
  m.impl("obs_group_errors", &slimops::obs_group_errors_cuda);
  m.impl("obs_group_update", &slimops::obs_group_update_cuda);
}
