// The one schema block of the `slimops` operator library (DESIGN.md: csrc/ops.cpp).
//
// Kernels live beside their family: csrc/<family>/<op>.cpp registers the CPU kernel with
// TORCH_LIBRARY_IMPL(slimops, CPU), csrc/<family>/cuda/*.cu the CUDA one. Fake (meta)
// kernels are registered from Python in slimops/ops.py, which also defines these same
// schemas itself when this extension is not built: keep the two lists identical.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace {

std::string build_info() {
#ifdef WITH_CUDA
  return "cuda";
#else
  return "cpu";
#endif
}

}  // namespace

TORCH_LIBRARY(slimops, m) {
  // Tells torch which Python module registers the fake impls, so tracing an op with
  // FakeTensors imports it instead of failing with "no fake impl".
  m.set_python_module("slimops.ops");

  // H[g] += scale * X[group_ids == g]^T X[group_ids == g]; H (G,d,d) fp32, X (T,d).
  m.def("hessian_accumulate(Tensor(a!) H, Tensor X, Tensor? group_ids, float scale) -> ()");
  // error_b = tr(W[:,S_b] Hinv[S_b,S_b]^-1 W[:,S_b]^T); +inf where the block is not PD.
  m.def("obs_group_errors(Tensor W, Tensor Hinv, Tensor groups) -> Tensor");
  // OBS update of W and rank-s downdate of Hinv for removing columns idx; returns a 0-dim
  // int32 info (>0: Hinv[S,S] not PD, W and Hinv untouched).
  m.def("obs_group_update(Tensor(a!) W, Tensor(b!) Hinv, Tensor idx) -> Tensor");
  // Y = X[:, I] @ W[J][:, I]^T (+ bias[J]); I = kept input blocks of width in_block (heads:
  // head_dim, channels: 1), J = kept output rows; None keeps all. Gathered in-kernel.
  m.def(
      "slice_gemm(Tensor X, Tensor W, Tensor? bias, Tensor? in_idx, Tensor? out_idx, "
      "int in_block) -> Tensor");
  // "cpu" or "cuda": which kernels this build contains (read by slimops.ops.backends()).
  m.def("_build_info() -> str", &build_info);
}

// `import slimops._C` loads this library (running the registrations above); the module
// itself is empty: every entry point is reached through torch.ops.slimops.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
