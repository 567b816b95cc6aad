// CPU kernel of the `hessian` family: grouped Hessian accumulation (SYRK).
//
//     H[g] += scale * X_g^T X_g      (X_g: rows of X whose group id is g)
//
// Semantics: kernels/hessian/reference.py. A blocked SYRK made of BLAS calls only: H is cut
// into kPanels row panels, and panel [i0, i1) is ONE GEMM, P = X[:, i0:i1]^T X[:, :i1], run by
// torch's BLAS on torch's intra-op threads, then added to H's lower part and mirrored into
// the upper part. n panels cost (1 + 1/n)/2 of a full X^T X's flops in n BLAS calls; no loop
// here is parallel, so nothing of ours spin-waits or splits work statically.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace slimops {
namespace {

// Panels, not tile tasks: 1.35-1.60x torch's addmm idle and under load, tasks 0.75-1.37x
// (benchmarks/RESULTS.md).
constexpr int64_t kPanels = 4;
// Narrower panels lose GEMM efficiency; below 2 * kMinPanel columns H is one panel (a full
// GEMM: tiny d, where the halved flops do not matter).
constexpr int64_t kMinPanel = 128;
// fp32 copies of X (upcast 16-bit rows, gathered groups) are made this many bytes at a time,
// and never fewer than kMinChunkRows rows (the GEMMs' K): T=8192 at d=2816 is one chunk.
constexpr int64_t kChunkBytes = int64_t(128) << 20;
constexpr int64_t kMinChunkRows = 4096;

// X itself when BLAS can read it as fp32 (one unit stride), else one contiguous fp32 copy.
at::Tensor as_blas_fp32(const at::Tensor& X) {
  if (X.scalar_type() == at::kFloat && (X.stride(1) == 1 || X.stride(0) == 1)) return X;
  return X.to(at::kFloat, /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
}

// H[i0:, i0:] += the lower triangle of the square block D, mirrored: the diagonal block's
// update is exactly symmetric whatever the GEMM's rounding.
void add_diagonal_block(const at::Tensor& H, const at::Tensor& D, int64_t i0) {
  const int64_t b = D.size(0);
  H.narrow(0, i0, b).narrow(1, i0, b).add_(D.tril()).add_(D.tril(-1).t());
}

// H (d, d) += scale * Xf^T Xf for fp32 rows Xf (n, d), one GEMM per row panel.
void syrk_panels(const at::Tensor& H, const at::Tensor& Xf, double scale) {
  const int64_t d = Xf.size(1);
  const int64_t width = std::max(kMinPanel, (d + kPanels - 1) / kPanels);
  for (int64_t i0 = 0; i0 < d; i0 += width) {
    const int64_t b = std::min(width, d - i0);
    at::Tensor P = at::mm(Xf.narrow(1, i0, b).t(), Xf.narrow(1, 0, i0 + b));  // (b, i0 + b)
    if (scale != 1.0) P.mul_(scale);  // scaled once, so both halves add the same values
    if (i0 > 0) {
      const at::Tensor below = P.narrow(1, 0, i0);
      H.narrow(0, i0, b).narrow(1, 0, i0).add_(below);
      H.narrow(0, 0, i0).narrow(1, i0, b).add_(below.t());
    }
    add_diagonal_block(H, P.narrow(1, i0, b), i0);
  }
}

// Accumulate rows of X (all of them, or those listed in `rows`) into H (d, d).
void accumulate_rows(const at::Tensor& H, const at::Tensor& X,
                     const c10::optional<at::Tensor>& rows, double scale) {
  if (!rows && X.scalar_type() == at::kFloat) {  // fp32 X is read in place: all rows in one pass
    syrk_panels(H, as_blas_fp32(X), scale);
    return;
  }
  const int64_t count = rows ? rows->numel() : X.size(0);
  const int64_t chunk = std::max(kMinChunkRows, kChunkBytes / (4 * X.size(1)));
  for (int64_t start = 0; start < count; start += chunk) {
    const int64_t n = std::min(chunk, count - start);
    const at::Tensor part =
        rows ? X.index_select(0, rows->narrow(0, start, n)) : X.narrow(0, start, n);
    syrk_panels(H, as_blas_fp32(part), scale);
  }
}

void hessian_accumulate_cpu(const at::Tensor& H, const at::Tensor& X,
                            const c10::optional<at::Tensor>& group_ids, double scale) {
  check_hessian_inputs(H, X, group_ids);
  if (X.size(0) == 0 || X.size(1) == 0) return;
  const int64_t G = H.size(0);
  if (!group_ids || G == 1) {  // G == 1 with ids: all ids are 0 (checked), no gather needed
    accumulate_rows(H[0], X, c10::nullopt, scale);
    return;
  }
  // Sort rows by group once; each group is then a contiguous slice of `order`.
  const at::Tensor order =
      std::get<1>(at::sort(*group_ids, /*stable=*/true, /*dim=*/0, /*descending=*/false));
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
