// (min, max) of a non-empty index tensor with ONE device-to-host copy: two .item() calls
// would be two blocking syncs on CUDA. Shared by the families' input checks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

namespace slimops {

inline std::pair<int64_t, int64_t> index_range(const at::Tensor& idx) {
  const auto [lo, hi] = at::aminmax(idx);
  const at::Tensor both = at::stack({lo, hi}).cpu();
  const int64_t* v = both.const_data_ptr<int64_t>();
  return {v[0], v[1]};
}

}  // namespace slimops
