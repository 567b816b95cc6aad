// Input checks of the `obs` ops, shared by the CPU kernels (obs.cpp) and the CUDA kernels
// (cuda/obs.cu) so both raise the same messages; kernels/obs/checks.py is the Python copy
// (tests/test_ops.py holds the two to identical messages).
#pragma once

#include <ATen/ATen.h>

#include "../common/index_range.h"

namespace slimops {

inline void check_w_hinv(const char* op, const at::Tensor& W, const at::Tensor& Hinv) {
  TORCH_CHECK(W.dim() == 2, op, ": W must have shape (r, d), got ", W.sizes());
  TORCH_CHECK(Hinv.dim() == 2 && Hinv.size(0) == Hinv.size(1), op,
              ": Hinv must be square (d, d), got ", Hinv.sizes());
  TORCH_CHECK(W.size(1) == Hinv.size(0), op, ": W has ", W.size(1), " columns but Hinv is ",
              Hinv.size(0), " x ", Hinv.size(1), "; W's columns are Hinv's rows");
  TORCH_CHECK(W.scalar_type() == at::kFloat && Hinv.scalar_type() == at::kFloat, op,
              ": W and Hinv must be float32, got ", W.scalar_type(), " and ", Hinv.scalar_type());
  TORCH_CHECK(W.device() == Hinv.device(), op, ": W and Hinv must be on the same device");
}

// Column indices must be int64 and in [0, d): a bad index would otherwise read or write
// outside W / Hinv's columns (index_select checks too, but with a message about `index`).
inline void check_indices(const char* op, const char* name, const at::Tensor& idx, int64_t d,
                          const at::Tensor& like) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": ", name, " must be int64 column indices, got ",
              idx.scalar_type());
  TORCH_CHECK(idx.device() == like.device(), op, ": ", name, " must be on W's device");
  if (idx.numel() == 0) return;
  const auto [min_i, max_i] = index_range(idx);
  TORCH_CHECK(min_i >= 0 && max_i < d, op, ": ", name, " must lie in [0, d=", d,
              "), got values in [", min_i, ", ", max_i, "]");
}

inline void check_errors_inputs(const at::Tensor& W, const at::Tensor& Hinv,
                                const at::Tensor& groups) {
  constexpr const char* op = "obs_group_errors";
  check_w_hinv(op, W, Hinv);
  TORCH_CHECK(groups.dim() == 2, op,
              ": groups must have shape (B, s) (one row of column indices per group), got ",
              groups.sizes());
  check_indices(op, "groups", groups, Hinv.size(0), W);
}

inline void check_update_inputs(const at::Tensor& W, const at::Tensor& Hinv,
                                const at::Tensor& idx) {
  constexpr const char* op = "obs_group_update";
  check_w_hinv(op, W, Hinv);
  TORCH_CHECK(idx.dim() == 1, op, ": idx must be a 1-D tensor of column indices, got shape ",
              idx.sizes());
  check_indices(op, "idx", idx, Hinv.size(0), W);
}

}  // namespace slimops
