// The torch headers every slimops .cu file needs, included so that both builds compile:
// torch's own CUDAExtension build and CI's bare `nvcc -c` syntax check against a CPU-only
// torch (see .ci/run).
//
// * torch's BFloat16.h calls constexpr host functions from host-device ones; torch's build
//   passes --expt-relaxed-constexpr, the plain syntax check does not: silence only those two
//   warnings, only for torch's headers.
// * c10's CUDA headers, not <ATen/cuda/CUDAContext.h>: that one pulls in cusparse.h and
//   cublas_v2.h, which a bare CUDA toolkit lacks. c10::cuda::getCurrentCUDAStream is the
//   function at::cuda::getCurrentCUDAStream names.
// * A CPU-only torch ships c10/cuda without its generated macros header (on Linux it only
//   sets a Windows export flag): skip it there.
#pragma once

#pragma nv_diag_suppress 20013, 20015
#include <ATen/ATen.h>
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#pragma nv_diag_default 20013, 20015
