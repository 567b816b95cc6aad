// Input checks of `hessian_accumulate`, shared by the CPU kernel (hessian.cpp) and the CUDA
// kernel (cuda/hessian.cu) so both raise the same messages; kernels/hessian/checks.py is the
// Python copy (tests/test_ops.py holds the two to identical messages).
#pragma once

#include <ATen/ATen.h>

#include "../common/index_range.h"

namespace slimops {

inline void check_hessian_inputs(const at::Tensor& H, const at::Tensor& X,
                                 const c10::optional<at::Tensor>& group_ids) {
  TORCH_CHECK(H.dim() == 3 && H.size(1) == H.size(2),
              "hessian_accumulate: H must have shape (G, d, d), got ", H.sizes());
  TORCH_CHECK(H.scalar_type() == at::kFloat,
              "hessian_accumulate: H must be float32 (the accumulator), got ", H.scalar_type());
  TORCH_CHECK(H.is_contiguous(),
              "hessian_accumulate: H must be contiguous; pass H.contiguous() and keep it");
  TORCH_CHECK(H.size(0) >= 1, "hessian_accumulate: H must hold at least one group (G >= 1)");
  TORCH_CHECK(X.dim() == 2, "hessian_accumulate: X must have shape (T, d), got ", X.sizes(),
              "; flatten leading dims with X.reshape(-1, d)");
  TORCH_CHECK(X.size(1) == H.size(1), "hessian_accumulate: X has width ", X.size(1), " but H is ",
              H.size(1), " x ", H.size(2));
  const auto xt = X.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
              "hessian_accumulate: X must be float32, bfloat16 or float16, got ", xt);
  TORCH_CHECK(X.device() == H.device(), "hessian_accumulate: H and X must be on the same device");
  if (!group_ids) {
    TORCH_CHECK(H.size(0) == 1, "hessian_accumulate: H has G=", H.size(0),
                " groups but group_ids is None; pass group_ids (T,) or use H of shape (1, d, d)");
    return;
  }
  const at::Tensor& ids = *group_ids;
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == X.size(0),
              "hessian_accumulate: group_ids must have shape (T,)=(", X.size(0), ",), got ",
              ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "hessian_accumulate: group_ids must be int64, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.device() == H.device(), "hessian_accumulate: group_ids must be on H's device");
  if (ids.numel() == 0) return;
  const auto [min_id, max_id] = index_range(ids);
  TORCH_CHECK(min_id >= 0 && max_id < H.size(0),
              "hessian_accumulate: group ids must lie in [0, G=", H.size(0), "), got values in [",
              min_id, ", ", max_id, "]");
}

}  // namespace slimops
