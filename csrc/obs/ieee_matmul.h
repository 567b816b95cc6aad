// Matrix products of the `obs` kernels in IEEE fp32 whatever torch's fp32 matmul precision,
// shared by obs.cpp and cuda/obs.cu. With "high" torch runs fp32 GEMMs in TF32 on GPUs and
// with "medium" in bf16 through oneDNN on CPUs that have it (measured on this dev box's AMX
// CPU: 2.4e-3 relative error for a 64 x 64 x 4000 product). OBS needs more: V = L^-1 Hinv[S,:]
// with 1e-3 error makes chained downdates Hinv -= V^T V lose positive definiteness.
//
// No global switch is flipped (not thread-safe, and mixing torch's legacy and new precision
// APIs makes its getters throw): when the precision in force is reduced, the product runs in
// fp64 and is rounded once to fp32, which no precision setting touches; at the default
// precision it is the plain fp32 GEMM.
#pragma once

#include <ATen/ATen.h>
#include <torch/version.h>

namespace slimops {

// Whether torch would take a reduced-precision shortcut for fp32 matmuls on t's device.
inline bool reduced_fp32_matmul(const at::Tensor& t) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  const auto backend = t.is_cuda() ? at::Float32Backend::CUDA : at::Float32Backend::MKLDNN;
  const auto p = at::globalContext().float32Precision(backend, at::Float32Op::MATMUL);
  return p == at::Float32Precision::TF32 || p == at::Float32Precision::BF16;
#else  // before the per-backend precision API: one switch for every backend
  return at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
#endif
}

// a @ b (or a batched bmm for 3-D operands) with IEEE fp32 products.
inline at::Tensor ieee_matmul(const at::Tensor& a, const at::Tensor& b) {
  if (!reduced_fp32_matmul(a)) return at::matmul(a, b);
  return at::matmul(a.to(at::kDouble), b.to(at::kDouble)).to(at::kFloat);
}

// C -= a @ b in place, with IEEE fp32 products.
inline void ieee_sub_matmul_(const at::Tensor& C, const at::Tensor& a, const at::Tensor& b) {
  if (!reduced_fp32_matmul(a)) {
    C.addmm_(a, b, 1.0, -1.0);
    return;
  }
  C.sub_(ieee_matmul(a, b));
}

}  // namespace slimops
