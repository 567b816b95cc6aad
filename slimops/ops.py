"""The one Python registration point of the `slimops` operators (DESIGN.md).

`import slimops._C` registers the schemas (csrc/ops.cpp) and the C++ CPU (and, in a CUDA
build, CUDA) kernels. Without the extension (SLIMOPS_NO_EXT=1, or a failed build) the same
schemas are defined here and the kernels/*/reference.py oracles serve as the CPU kernels,
so every caller works unchanged, only slower. Fake impls for tracing are registered here in
both cases. Callers use the wrappers below, never torch.ops directly.
"""

from __future__ import annotations

import logging
import os

import torch

from slimops.kernels.hessian import checks as hessian_checks
from slimops.kernels.hessian import reference as hessian_ref
from slimops.kernels.obs import checks as obs_checks
from slimops.kernels.obs import reference as obs_ref
from slimops.kernels.slice_gemm import checks as slice_checks
from slimops.kernels.slice_gemm import reference as slice_ref

# Keep identical to the TORCH_LIBRARY block in csrc/ops.cpp.
SCHEMAS = {
    "hessian_accumulate": "(Tensor(a!) H, Tensor X, Tensor? group_ids, float scale) -> ()",
    "obs_group_errors": "(Tensor W, Tensor Hinv, Tensor groups) -> Tensor",
    "obs_group_update": "(Tensor(a!) W, Tensor(b!) Hinv, Tensor idx) -> Tensor",
    "slice_gemm": "(Tensor X, Tensor W, Tensor? bias, Tensor? in_idx, Tensor? out_idx, "
    "int in_block) -> Tensor",
}

_EXT_ERROR = None
if os.environ.get("SLIMOPS_NO_EXT", "0") not in ("", "0"):  # also at run time: test the fallback
    _EXT_ERROR = "SLIMOPS_NO_EXT is set"
else:
    try:
        import slimops._C  # noqa: F401  (loads the library: schemas + C++ kernels)
    except ImportError as exc:  # not built, or built against another torch
        _EXT_ERROR = f"{type(exc).__name__}: {exc}"
        # Said once, not silently slow: a plain `pip install .` builds no kernels (setup.py).
        logging.getLogger("slimops").warning(
            "slimops: the C++ extension slimops._C is not available (%s): the ops run their "
            "PyTorch references (correct, slower). For the kernels: pip install torch first, "
            "then pip install --no-build-isolation . (SLIMOPS_NO_EXT=1 silences this)",
            _EXT_ERROR,
        )


# --- pure-Python fallback: the references, wrapped to the ops' exact contracts ----------
# Each family's checks.py holds the one Python copy of its C++ kernel's checks and messages.


def _hessian_accumulate_py(H, X, group_ids, scale):
    hessian_checks.check_inputs(H, X, group_ids)
    hessian_ref.hessian_accumulate(H, X, group_ids, scale)


def _obs_group_errors_py(W, Hinv, groups):
    obs_checks.check_errors_inputs(W, Hinv, groups)
    blocks = Hinv[groups.unsqueeze(-1), groups.unsqueeze(-2)]  # (B, s, s)
    L, info = obs_ref.block_cholesky(blocks)
    err = obs_ref.group_errors(W[:, groups].permute(1, 0, 2), L)  # W_blocks (B, r, s)
    return err.masked_fill(info > 0, float("inf"))


def _obs_group_update_py(W, Hinv, idx):
    obs_checks.check_update_inputs(W, Hinv, idx)
    _, info = torch.linalg.cholesky_ex(Hinv[idx][:, idx])
    if idx.numel() > 0 and int(info) == 0:  # not PD: leave W and Hinv untouched
        obs_ref.group_update(W, Hinv, idx)
    return info.to(torch.int32)


def _slice_gemm_py(X, W, bias, in_idx, out_idx, in_block):
    slice_checks.check_inputs(X, W, bias, in_idx, out_idx, in_block)
    return slice_ref.slice_gemm(X, W, bias, in_idx, out_idx, in_block)


_PY_KERNELS = {
    "hessian_accumulate": _hessian_accumulate_py,
    "obs_group_errors": _obs_group_errors_py,
    "obs_group_update": _obs_group_update_py,
    "slice_gemm": _slice_gemm_py,
}
# Define what the extension did not (all of it without _C) and give every op a CPU kernel:
# an op whose C++ kernel is not written yet runs its reference instead of failing.
BACKENDS = ("cpu", "triton", "cuda")


def has_kernel(op: str, backend: str) -> bool:
    """Whether `op` has a kernel for `backend` here: "cpu" / "cuda" ask torch's dispatcher
    for a kernel under that dispatch key (the C++ extension, or the reference fallback
    registered below); "triton" asks whether Triton can run now (a GPU, or the interpreter)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton":
        return _triton_status().startswith("available")
    # The one place slimops asks the dispatcher directly: torch has no public equivalent.
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"slimops::{op}", backend.upper())


_LIB = torch.library.Library("slimops", "FRAGMENT")  # kept alive: dropping it unregisters
for _name, _fn in _PY_KERNELS.items():
    if not hasattr(torch.ops.slimops, _name):  # no extension: define the schema here
        _LIB.define(_name + SCHEMAS[_name])
    if not has_kernel(_name, "cpu"):
        _LIB.impl(_name, _fn, "CPU")


# --- fake (meta) impls: shapes only, for torch.compile / FakeTensor tracing -------------


@torch.library.register_fake("slimops::hessian_accumulate")
def _(H, X, group_ids, scale):
    return None


@torch.library.register_fake("slimops::obs_group_errors")
def _(W, Hinv, groups):
    return W.new_empty((groups.shape[0],))


@torch.library.register_fake("slimops::obs_group_update")
def _(W, Hinv, idx):
    return W.new_empty((), dtype=torch.int32)


@torch.library.register_fake("slimops::slice_gemm")
def _(X, W, bias, in_idx, out_idx, in_block):
    rows = W.shape[0] if out_idx is None else out_idx.shape[0]
    return X.new_empty((X.shape[0], rows))


# --- backend dispatch ----------------------------------------------------------------
# CPU tensors go to the C++ kernels (or the references). CUDA tensors go to the faster of the
# two GPU paths; which one is faster is a measurement (benchmarks/RESULTS.md). Until one is
# recorded the CUDA-extension kernel is preferred when built, else Triton.
# SLIMOPS_BACKEND=cpu|triton|cuda forces one (Triton runs on CPU under TRITON_INTERPRET=1).
_TRITON_MODULES = {
    "hessian_accumulate": "hessian",
    "obs_group_errors": "obs",
    "obs_group_update": "obs",
    "slice_gemm": "slice_gemm",
}


def _triton_kernel(op: str):
    import importlib

    module = importlib.import_module(f"slimops.kernels.{_TRITON_MODULES[op]}.triton")
    return getattr(module, op)


def backend_for(op: str, device: torch.device) -> str:
    forced = os.environ.get("SLIMOPS_BACKEND", "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SLIMOPS_BACKEND={forced!r}: choose one of {', '.join(BACKENDS)}")
        if forced == "cuda" and not has_kernel(op, "cuda"):
            raise RuntimeError(
                f"SLIMOPS_BACKEND=cuda but {op} has no CUDA kernel: {backends()['cuda']}"
            )
        if forced != "triton" and (forced == "cuda") != (device.type == "cuda"):
            raise RuntimeError(f"SLIMOPS_BACKEND={forced} cannot run {op} on {device} tensors")
        return forced
    if device.type != "cuda":
        return "cpu"
    return "cuda" if has_kernel(op, "cuda") else "triton"


def _dispatch(op: str, device: torch.device, *args, check_indices: bool = True):
    # check_indices=False: the caller validated its index tensors once per plan, so the Triton
    # launcher skips the range check, a device sync per call. The C++ kernels check anyway:
    # without a sync on CPU, on the device for CUDA slice_gemm, with one sync for CUDA obs /
    # hessian (a schema flag would be needed to skip it there).
    if backend_for(op, device) == "triton":
        return _triton_kernel(op)(*args, check_indices=check_indices)
    return getattr(torch.ops.slimops, op)(*args)


# --- public API --------------------------------------------------------------------------


def hessian_accumulate(
    H: torch.Tensor,
    X: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    check_indices: bool = True,
) -> None:
    """In place: H[g] += scale * X_g^T X_g. H (G, d, d) fp32; X (..., d) fp32/bf16/fp16 (leading
    dims are flattened); group_ids (...,) int64 in [0, G), or None when G == 1."""
    X = X.reshape(-1, X.shape[-1])
    if group_ids is not None:
        group_ids = group_ids.reshape(-1)
    _dispatch(
        "hessian_accumulate", H.device, H, X, group_ids, float(scale), check_indices=check_indices
    )


def obs_group_errors(
    W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor, *, check_indices: bool = True
) -> torch.Tensor:
    """OBS error of removing each group of columns: (B,) fp32, +inf where Hinv[S,S] is not PD.
    W (r, d) fp32, Hinv (d, d) fp32, groups (B, s) int64 column indices."""
    return _dispatch("obs_group_errors", W.device, W, Hinv, groups, check_indices=check_indices)


def obs_group_update(
    W: torch.Tensor, Hinv: torch.Tensor, idx: torch.Tensor, *, check_indices: bool = True
) -> int:
    """Remove columns idx: OBS update of W and rank-s downdate of Hinv, in place. Returns 0 on
    success, > 0 when Hinv[idx, idx] is not PD (then W and Hinv are unchanged: refactorise)."""
    return int(
        _dispatch("obs_group_update", W.device, W, Hinv, idx, check_indices=check_indices).item()
    )


def slice_gemm(
    X: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None = None,
    in_idx: torch.Tensor | None = None,
    out_idx: torch.Tensor | None = None,
    in_block: int = 1,
    *,
    check_indices: bool = True,
) -> torch.Tensor:
    """Y = X[:, I] @ W[J][:, I]^T (+ bias[J]), I = kept input blocks of width in_block (heads:
    head_dim; channels: 1), J = kept output rows (None keeps all); gathered in-kernel.
    check_indices=False (every op here takes it): indices already validated once per plan."""
    return _dispatch(
        "slice_gemm",
        X.device,
        X,
        W,
        bias,
        in_idx,
        out_idx,
        int(in_block),
        check_indices=check_indices,
    )


def backends() -> dict[str, str]:
    """Which implementation serves each backend, and why the others do not."""
    if _EXT_ERROR is None:
        build = torch.ops.slimops._build_info()
        cpu = "C++ extension slimops._C"
    else:
        build, cpu = None, f"python reference (extension not built: {_EXT_ERROR})"
    if torch.version.cuda is None:
        cuda = "not available: torch has no CUDA"
    elif build != "cuda":
        cuda = (
            "not available: extension built without CUDA"
            if build
            else "not available: extension not built"
        )
    else:
        cuda = "C++/CUDA extension slimops._C"
    return {"cpu": cpu, "triton": _triton_status(), "cuda": cuda}


def _triton_status() -> str:
    # Never import triton here: whether it interprets is fixed at its first import, and a
    # status query must not freeze that before a caller sets TRITON_INTERPRET=1.
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "not available: triton is not installed"
    version = importlib.metadata.version("triton")
    if torch.cuda.is_available():
        return f"available (triton {version})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return f"available under the interpreter (TRITON_INTERPRET=1, triton {version})"
    return "not available: no CUDA device (TRITON_INTERPRET=1 runs it on CPU, slowly)"
