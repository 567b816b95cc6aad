// Input checks of `slice_gemm`, shared by the CPU kernel (slice_gemm.cpp) and the CUDA kernel
// (cuda/slice_gemm.cu) so both raise the same messages; kernels/slice_gemm/checks.py is the
// Python copy (tests/test_slice_gemm.py holds the two to identical messages).
#pragma once

#include <ATen/ATen.h>

#include "../common/index_range.h"

namespace slimops {

// int64, 1-D, on X's device and, when check_values, every value in [0, limit): a bad index
// would otherwise surface as index_select's message about `index`, naming neither the
// argument nor the fix.
inline void check_slice_index(const char* name, const at::Tensor& idx, int64_t limit,
                              const char* what, const at::Tensor& X, bool check_values) {
  TORCH_CHECK(idx.dim() == 1, "slice_gemm: ", name, " must be a 1-D tensor of kept ", what,
              ", got shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "slice_gemm: ", name, " must be int64, got ",
              idx.scalar_type(), "; pass ", name, ".long()");
  TORCH_CHECK(idx.device() == X.device(), "slice_gemm: ", name, " must be on X's device (",
              X.device(), "), got ", idx.device());
  if (!check_values || idx.numel() == 0) return;
  const auto [min_i, max_i] = index_range(idx);
  TORCH_CHECK(min_i >= 0 && max_i < limit, "slice_gemm: ", name, " must lie in [0, ", limit,
              ") (number of ", what, "), got values in [", min_i, ", ", max_i, "]");
}

// check_values=false leaves the index ranges to the caller: the CUDA kernel checks them on
// the device (CUDA_KERNEL_ASSERT), as a host check is a sync per call.
inline void check_slice_gemm_inputs(const at::Tensor& X, const at::Tensor& W,
                                    const c10::optional<at::Tensor>& bias,
                                    const c10::optional<at::Tensor>& in_idx,
                                    const c10::optional<at::Tensor>& out_idx, int64_t in_block,
                                    bool check_values) {
  TORCH_CHECK(X.dim() == 2, "slice_gemm: X must have shape (T, d_in), got ", X.sizes(),
              "; flatten leading dims with X.reshape(-1, d_in)");
  TORCH_CHECK(W.dim() == 2, "slice_gemm: W must have shape (d_out, d_in), got ", W.sizes());
  TORCH_CHECK(X.size(1) == W.size(1), "slice_gemm: X has width ", X.size(1), " but W is ",
              W.size(0), " x ", W.size(1),
              "; X must be at full input width (the slice is taken inside the op)");
  const auto dt = X.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "slice_gemm: X must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(W.scalar_type() == dt, "slice_gemm: X and W must have the same dtype, got ", dt,
              " and ", W.scalar_type());
  TORCH_CHECK(W.device() == X.device(), "slice_gemm: X and W must be on the same device, got ",
              X.device(), " and ", W.device());
  TORCH_CHECK(in_block >= 1,
              "slice_gemm: in_block must be >= 1 (head_dim for heads, 1 for channels), got ",
              in_block);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == W.size(0),
                "slice_gemm: bias must have shape (d_out,)=(", W.size(0),
                ",) at full output width, got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dt, "slice_gemm: bias must have X's dtype ", dt, ", got ",
                bias->scalar_type(), "; pass bias.to(X.dtype)");
    TORCH_CHECK(bias->device() == X.device(), "slice_gemm: bias must be on X's device");
  }
  if (in_idx) {
    TORCH_CHECK(X.size(1) % in_block == 0, "slice_gemm: d_in=", X.size(1),
                " is not a multiple of in_block=", in_block,
                "; in_idx counts blocks of in_block columns");
    check_slice_index("in_idx", *in_idx, X.size(1) / in_block, "input blocks", X, check_values);
  }
  if (out_idx) check_slice_index("out_idx", *out_idx, W.size(0), "output rows", X, check_values);
}

}  // namespace slimops
