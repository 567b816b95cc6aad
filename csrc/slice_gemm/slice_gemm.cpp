// CPU kernel of the `slice_gemm` family: a GEMM on a structured slice of W.
//
//     cols = expand(in_idx, in_block)       kept input blocks (heads: head_dim, channels: 1)
//     Y    = X[:, cols] @ W[out_idx][:, cols]^T (+ bias[out_idx])
//
// Semantics: kernels/slice_gemm/reference.py. Two paths, both fp32-accumulating BLAS GEMMs
// written straight into column blocks of an fp32 Y, rounded once at the end:
//  * runs (kept columns in runs >= kMinRunCols wide on average: sorted kept heads): one
//    GEMM per run of consecutive kept columns on strided views of X and W, so W's columns
//    are never gathered;
//  * gather (channels): X's kept columns gathered and upcast once ((T, |I|) is small
//    next to W), W's slice gathered and upcast kChunkRows output rows at a time, so the
//    scratch stays chunk x |I| instead of a full |J| x |I| copy of the slice.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "checks.h"

namespace slimops {
namespace {

// Output rows of W per GEMM. Measured (2048 x 5504 fp32, 75% of the channels kept, 2
// threads on a box shared with compiles, +-20% noise): chunks of 128 .. 1024 rows are within
// noise of each other at T = 1, 16, 256; the whole slice at once (2048) is up to 4x slower
// at T = 1 and 16 (a 34 MB copy that leaves the caches before the GEMM reads it back).
constexpr int64_t kChunkRows = 512;

// Mean width of the runs of consecutive kept columns from which per-run GEMMs replace the
// gather. Measured as above (fp32), 75% of
// the blocks kept, runs vs gather ms: mean width 455: T=1 5 vs 28, T=256 59 vs 66;
// width 115-133: T=16 17.4 vs 17.8, T=256 64 vs 64; width 61: T=256 70 vs 66 (T=1 still
// 10 vs 22). 128 takes the runs where they never lose.
constexpr int64_t kMinRunCols = 128;

// Up to this many tokens, kept rows are selected from the full output instead of gathered
// from W (slice_gemm_cpu). Measured (2048 x 5504 fp32, 75% of the rows kept, noisy box),
// ms select vs gather: T=1: 2.5 vs 10.9; T=16-17: 14-16 vs 15-19; T=64: 26-28 vs 24-28.
constexpr int64_t kDecodeRows = 16;

// Column indices of the kept blocks: b*in_block + [0, in_block) for every b in in_idx.
at::Tensor expand_blocks(const at::Tensor& in_idx, int64_t in_block) {
  if (in_block == 1) return in_idx;
  const at::Tensor offsets = at::arange(in_block, in_idx.options());
  return (in_idx.unsqueeze(1) * in_block + offsets).reshape({-1});
}

// Yc (T, n) = bias_c, or zero: the accumulator every product below adds into.
void init_out(at::Tensor& Yc, const at::Tensor& bias_c) {
  if (bias_c.defined())
    Yc.copy_(bias_c.unsqueeze(0).expand_as(Yc));
  else
    Yc.zero_();
}

// Runs of consecutive kept blocks as (first column, width): sorted kept heads give a few
// wide runs, scattered channels many narrow ones.
std::vector<std::pair<int64_t, int64_t>> column_runs(const at::Tensor& in_idx, int64_t in_block) {
  const at::Tensor idx = in_idx.contiguous();
  const int64_t* b = idx.const_data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t i = 0; i < idx.numel(); ++i) {
    const int64_t col = b[i] * in_block;
    if (!runs.empty() && runs.back().first + runs.back().second == col)
      runs.back().second += in_block;
    else
      runs.emplace_back(col, in_block);
  }
  return runs;
}

// Rows j0 .. j0+n of the kept rows of W (a view when out_idx is None).
at::Tensor weight_rows(const at::Tensor& W, const c10::optional<at::Tensor>& out_idx, int64_t j0,
                       int64_t n) {
  return out_idx ? W.index_select(0, out_idx->narrow(0, j0, n)) : W.narrow(0, j0, n);
}

// Wide runs: one GEMM per run on strided views of X and W, so W's columns are never
// gathered (fp32 W is not copied at all without out_idx; 16-bit W is upcast row-contiguously).
void slice_gemm_runs(at::Tensor& Y, const at::Tensor& X, const at::Tensor& W,
                     const at::Tensor& bias_f, const c10::optional<at::Tensor>& out_idx,
                     const std::vector<std::pair<int64_t, int64_t>>& runs) {
  const at::Tensor Xf = X.to(at::kFloat);
  for (int64_t j0 = 0; j0 < Y.size(1); j0 += kChunkRows) {
    const int64_t n = std::min(kChunkRows, Y.size(1) - j0);
    const at::Tensor Wr = weight_rows(W, out_idx, j0, n).to(at::kFloat);
    at::Tensor Yc = Y.narrow(1, j0, n);
    init_out(Yc, bias_f.defined() ? bias_f.narrow(0, j0, n) : bias_f);
    for (const auto& [c0, w] : runs) Yc.addmm_(Xf.narrow(1, c0, w), Wr.narrow(1, c0, w).t());
  }
}

// Otherwise: gather X's kept columns once (fp32), W's slice chunk by chunk (fp32), one GEMM
// per chunk written straight into its column block of Y. Upcast before the column gather:
// measured 25-31 ms against 50-75 ms the other way round (2048 x 5504 bf16, 75% kept).
void slice_gemm_gather(at::Tensor& Y, const at::Tensor& X, const at::Tensor& W,
                       const at::Tensor& bias_f, const c10::optional<at::Tensor>& out_idx,
                       const at::Tensor& cols) {
  const at::Tensor Xf = X.to(at::kFloat);
  const at::Tensor Xs = cols.defined() ? Xf.index_select(1, cols) : Xf.contiguous();
  for (int64_t j0 = 0; j0 < Y.size(1); j0 += kChunkRows) {
    const int64_t n = std::min(kChunkRows, Y.size(1) - j0);
    at::Tensor Wc = weight_rows(W, out_idx, j0, n).to(at::kFloat);
    if (cols.defined()) Wc = Wc.index_select(1, cols);
    at::Tensor Yc = Y.narrow(1, j0, n);
    init_out(Yc, bias_f.defined() ? bias_f.narrow(0, j0, n) : bias_f);
    Yc.addmm_(Xs, Wc.t());
  }
}

// Y (T, |J|) in X's dtype, inputs already checked.
at::Tensor slice_gemm_impl(const at::Tensor& X, const at::Tensor& W,
                           const c10::optional<at::Tensor>& bias,
                           const c10::optional<at::Tensor>& in_idx,
                           const c10::optional<at::Tensor>& out_idx, int64_t in_block) {
  const int64_t n_out = out_idx ? out_idx->numel() : W.size(0);
  at::Tensor bias_f;  // bias of the kept rows, fp32 (added before the single final rounding)
  if (bias) bias_f = (out_idx ? bias->index_select(0, *out_idx) : *bias).to(at::kFloat);
  at::Tensor Y = at::empty({X.size(0), n_out}, X.options().dtype(at::kFloat));

  const auto runs =
      in_idx ? column_runs(*in_idx, in_block) : std::vector<std::pair<int64_t, int64_t>>();
  if (!runs.empty() &&
      in_idx->numel() * in_block >= kMinRunCols * static_cast<int64_t>(runs.size())) {
    slice_gemm_runs(Y, X, W, bias_f, out_idx, runs);
  } else {
    slice_gemm_gather(Y, X, W, bias_f, out_idx,
                      in_idx ? expand_blocks(*in_idx, in_block) : at::Tensor());
  }
  return X.scalar_type() == at::kFloat ? Y : Y.to(X.scalar_type());
}

at::Tensor slice_gemm_cpu(const at::Tensor& X, const at::Tensor& W,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& in_idx,
                          const c10::optional<at::Tensor>& out_idx, int64_t in_block) {
  check_slice_gemm_inputs(X, W, bias, in_idx, out_idx, in_block, /*check_values=*/true);
  // Decode-sized T is bound by reading W: computing every row and keeping |J| of the outputs
  // reads d_out rows once, where gathering the kept rows first reads, writes and re-reads
  // |J| of them (numbers at kDecodeRows). Exact either way: each output is its own dot
  // product, and a non-finite value in a dropped row only reaches dropped outputs.
  if (out_idx && X.size(0) <= kDecodeRows && 3 * out_idx->numel() >= W.size(0))
    return slice_gemm_impl(X, W, bias, in_idx, c10::nullopt, in_block).index_select(1, *out_idx);
  return slice_gemm_impl(X, W, bias, in_idx, out_idx, in_block);
}

}  // namespace
}  // namespace slimops

TORCH_LIBRARY_IMPL(slimops, CPU, m) { m.impl("slice_gemm", &slimops::slice_gemm_cpu); }
