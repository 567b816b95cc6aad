"""slimops kernels: one folder per family (hessian, obs, slice_gemm), each with a paper-like
PyTorch `reference.py` (the oracle every backend is tested against) beside its fast paths.

The families live in the repository's top-level `kernels/` folder. That folder is NOT a
Python package (no `__init__.py`): with the repository root on sys.path (`python -m pytest`,
`python -m slimops.cli` in a checkout) a regular package named `kernels` there would shadow
the PyPI package `kernels`, which transformers imports for its hub kernels. The families are
reached only as `slimops.kernels.<family>`:
  * installed from a wheel, setup.py copies them next to this file;
  * in a checkout (editable install, or the root on sys.path) this package's search path is
    extended to the top-level folder, found by its own files so no other `kernels` is taken.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CHECKOUT_KERNELS = _HERE.parents[1] / "kernels"
if not (_HERE / "hessian").is_dir() and (_CHECKOUT_KERNELS / "hessian" / "reference.py").is_file():
    __path__.append(str(_CHECKOUT_KERNELS))  # noqa: F821  (a package's own __path__)
