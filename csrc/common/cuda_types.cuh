// 16-bit <-> fp32 conversions and the tensor-core switch shared by the CUDA kernels
// (hessian.cu, slice_gemm.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace slimops {

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(v);
  else
    return v;
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(v);
  else
    return v;
}

// Tensor cores for 16-bit inputs; bf16 WMMA needs sm_80 (the host pass has no __CUDA_ARCH__).
template <typename T>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kUseWmma = std::is_same_v<T, __half>;
#else
constexpr bool kUseWmma = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;
#endif

}  // namespace slimops
