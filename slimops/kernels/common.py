"""What the three kernel families share on the host: the C++ kernels' message formatting
(so the Python checks raise exactly the C++ messages), one-sync index ranges, and the
Triton launch context. Imports no triton: checks run in the pure-Python fallback too."""

from __future__ import annotations

import contextlib
import os

import torch

# The interpreter runs Triton on CPU tensors (tests without a GPU); read once, as triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# How c10 prints a ScalarType (the C++ messages name dtypes this way).
_CPP_DTYPE = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
}


def check(ok: bool, op: str, msg: str) -> None:
    """TORCH_CHECK(ok, op, ": ", msg): the same RuntimeError the C++ kernels raise."""
    if not ok:
        raise RuntimeError(f"{op}: {msg}")


def dtype_name(dtype: torch.dtype) -> str:
    return _CPP_DTYPE.get(dtype, str(dtype))


def sizes(t: torch.Tensor) -> str:
    """A tensor's shape as c10 prints IntArrayRef: [3, 4]."""
    return str(list(t.shape))


def index_range(idx: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty index tensor with ONE device-to-host copy (two .item()s
    would be two syncs on CUDA)."""
    lo, hi = torch.aminmax(idx)
    return tuple(torch.stack((lo, hi)).tolist())


def check_triton_device(op: str, t: torch.Tensor) -> None:
    """Compiled Triton needs CUDA tensors; CPU tensors only run under the interpreter."""
    check(
        t.is_cuda or INTERPRET,
        op,
        f"the Triton kernel needs CUDA tensors, got {t.device} "
        "(set TRITON_INTERPRET=1 before importing triton to run it on CPU)",
    )


def on_device(t: torch.Tensor):
    """Context for a Triton launch: Triton launches on the CURRENT device, so tensors on
    cuda:1 need cuda:1 made current (else an illegal address); a no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
