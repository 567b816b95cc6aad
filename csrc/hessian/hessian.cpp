// CPU kernel of the `hessian` family: grouped Hessian accumulation (SYRK).
//
//     H[g] += scale * X_g^T X_g      (X_g: rows of X whose group id is g)
//
// Semantics: kernels/hessian/reference.py. X streams through in chunks of kChunkRows rows,
// each converted to fp32 once, in a transposed (d, rows) layout so that every column tile
// is a contiguous row block. Only the lower-triangle tile pairs (i >= j) are multiplied, so
// the flops are T*d^2 instead of 2*T*d^2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"

#include <vector>

namespace slimops {
namespace {

// Rows of X converted to fp32 per step: bounds the scratch to d*4096*4 bytes (16 MB at
// d=1024, 180 MB at d=11008) while each tile product still has a long K dimension.
constexpr int64_t kChunkRows = 4096;

// Column tile of the SYRK. Measured on the 2-core dev box (MKL, fp32, 4096-row chunks,
// 1 thread, GFLOP/s counted as dense 2*T*d^2 so 2x = the SYRK saving; one addmm over the
// whole H: 90-95): tile 128: 145-153, 192: 143-160, 256: 140-159, 384: 133-161, 512:
// 123-156. From 192 up each tile product runs at full GEMM speed; 256 is flat within
// noise from d=1024 to 4096, wastes < 256/d on the whole-computed diagonal tiles, and
// still leaves 136 tile tasks per chunk at d=4096 for the parallel loop below.
constexpr int64_t kTile = 256;

// H (d, d) += scale * Xt Xt^T for one fp32 chunk Xt (d, n), lower-triangle tiles only.
// An off-diagonal product P is added to both H[i,j] and H[j,i]^T right away (mirrored per
// tile, not in a final pass): H need not be symmetric on entry and no d x d scratch is
// needed; the extra tile-sized add is 1/n of the tile's flops.
void syrk_chunk(const at::Tensor& H, const at::Tensor& Xt, double scale) {
  const int64_t d = Xt.size(0);
  const int64_t tiles = (d + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  pairs.reserve(tiles * (tiles + 1) / 2);
  for (int64_t i = 0; i < tiles; ++i)
    for (int64_t j = 0; j <= i; ++j) pairs.emplace_back(i, j);

  // Tile tasks run in parallel (one sync per chunk, not one per tile GEMM). Measured here
  // with 2 threads while another process held one core: 32-34 GFLOP/s for tasks and for a
  // sequential loop of threaded GEMMs alike (OpenMP threads spin-waiting for a busy core;
  // OMP_WAIT_POLICY=PASSIVE gives 140-154 for both), so a loaded machine wants PASSIVE.
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), /*grain_size=*/1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const auto [i, j] = pairs[p];
      const int64_t i0 = i * kTile, ti = std::min(kTile, d - i0);
      const int64_t j0 = j * kTile, tj = std::min(kTile, d - j0);
      const at::Tensor Xi = Xt.narrow(0, i0, ti);
      if (i == j) {
        H.narrow(0, i0, ti).narrow(1, i0, ti).addmm_(Xi, Xi.t(), 1.0, scale);
        continue;
      }
      const at::Tensor P = at::mm(Xi, Xt.narrow(0, j0, tj).t());
      H.narrow(0, i0, ti).narrow(1, j0, tj).add_(P, scale);
      H.narrow(0, j0, tj).narrow(1, i0, ti).add_(P.t(), scale);
    }
  });
}

// Accumulate rows of X (all of them, or those listed in `rows`) into H (d, d).
void accumulate_rows(const at::Tensor& H, const at::Tensor& X, const c10::optional<at::Tensor>& rows,
                     double scale) {
  const int64_t count = rows ? rows->numel() : X.size(0);
  const int64_t d = X.size(1);
  at::Tensor Xt = at::empty({d, std::min(count, kChunkRows)}, X.options().dtype(at::kFloat));
  for (int64_t start = 0; start < count; start += kChunkRows) {
    const int64_t n = std::min(kChunkRows, count - start);
    const at::Tensor chunk = rows ? X.index_select(0, rows->narrow(0, start, n)) : X.narrow(0, start, n);
    at::Tensor dst = Xt.narrow(1, 0, n);
    if (n < Xt.size(1)) dst = at::empty({d, n}, Xt.options());  // last, shorter chunk
    dst.copy_(chunk.t());  // transpose + upcast in one pass
    syrk_chunk(H, dst, scale);
  }
}

void hessian_accumulate_cpu(const at::Tensor& H, const at::Tensor& X, const c10::optional<at::Tensor>& group_ids,
                            double scale) {
  check_hessian_inputs(H, X, group_ids);
  if (X.size(0) == 0 || X.size(1) == 0) return;
  const int64_t G = H.size(0);
  if (!group_ids || G == 1) {  // G == 1 with ids: all ids are 0 (checked), no gather needed
    accumulate_rows(H[0], X, c10::nullopt, scale);
    return;
  }
  // Sort rows by group once; each group is then a contiguous slice of `order`.
  const at::Tensor order = std::get<1>(at::sort(*group_ids, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::bincount(*group_ids, {}, G).cpu();
  const int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t offset = 0;
  for (int64_t g = 0; g < G; ++g) {
    if (cnt[g] > 0) accumulate_rows(H[g], X, order.narrow(0, offset, cnt[g]), scale);
    offset += cnt[g];
  }
}

}  // namespace
}  // namespace slimops

TORCH_LIBRARY_IMPL(slimops, CPU, m) {
  m.impl("hessian_accumulate", &slimops::hessian_accumulate_cpu);
}
