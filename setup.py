"""Build of slimops: the Python package plus the optional C++/CUDA extension slimops._C.

Metadata and dependencies live in pyproject.toml; this file only decides what to compile.
Install with `pip install --no-build-isolation -e ".[dev]"` (see pyproject.toml: the
extension is compiled against the torch that is already installed).

Extension choice (ARCHITECTURE.md):
  * SLIMOPS_NO_EXT=1                      -> no extension: pure Python, reference kernels
  * torch not importable at build time    -> the same, with a warning: a plain `pip install .`
    (build isolation hides the installed torch)  runs setup.py in a fresh environment
  * torch has CUDA, CUDA_HOME is set and
    nvcc's major version == torch's CUDA  -> CUDAExtension: csrc/**/*.cpp + csrc/**/cuda/*.cu
  * otherwise                             -> CppExtension: csrc/**/*.cpp (CPU kernels)
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# -O2: the kernels are mostly ATen/BLAS calls, -O3 only lengthens builds on 2 cores. No
# -std flag: torch's BuildExtension adds the standard its headers need (C++20 for 2.10+).
CXX_FLAGS = ["-O2"]
NVCC_FLAGS = ["-O2"]


def _sources(pattern):
    return sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )


def _nvcc_major(cuda_home):
    """Major version of the nvcc in CUDA_HOME, or None when it cannot be run."""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def _cuda_reason(torch, cuda_home):
    """None when a CUDA build is possible, else why not (printed, never fatal)."""
    if torch.version.cuda is None:
        return "torch is a CPU build (torch.version.cuda is None)"
    if not cuda_home:
        return "CUDA_HOME is not set / no CUDA toolkit found"
    nvcc = _nvcc_major(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc is None:
        return f"no runnable nvcc in CUDA_HOME={cuda_home}"
    if nvcc != torch_major:
        return f"nvcc major version {nvcc} != torch's CUDA {torch.version.cuda}"
    return None


NO_TORCH = (
    "slimops: WARNING: torch is not importable at build time (pip's build isolation "
    "hides the installed torch), so the C++/CUDA kernels are not built and the ops run "
    "their slower PyTorch references. For the kernels: pip install torch first, then "
    "pip install --no-build-isolation ."
)


def _pure_python(message, drop_stale=False):
    if drop_stale:  # an editable build left slimops/_C*.so in the tree: it would keep loading
        for stale in glob.glob(os.path.join(ROOT, "slimops", "_C.*")):
            os.remove(stale)
    print(message, file=sys.stderr)
    return [], {}


def extensions():
    """(ext_modules, cmdclass) for slimops._C, or ([], {}) for a pure-Python install."""
    if os.environ.get("SLIMOPS_NO_EXT", "0") not in ("", "0"):
        return _pure_python(
            "slimops: SLIMOPS_NO_EXT set, building no extension (pure Python)", drop_stale=True
        )
    try:
        import torch  # the extension compiles against it: hence --no-build-isolation
    except ImportError:
        return _pure_python(NO_TORCH)
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = [p for p in _sources("csrc/**/*.cpp") if f"{os.sep}cuda{os.sep}" not in p]
    reason = _cuda_reason(torch, CUDA_HOME)
    if reason is None:
        cuda = _sources("csrc/**/cuda/*.cpp") + _sources("csrc/**/cuda/*.cu")
        print(f"slimops: building CUDAExtension slimops._C ({len(cpp) + len(cuda)} sources)")
        ext = CUDAExtension(
            "slimops._C",
            cpp + cuda,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    else:
        print(f"slimops: building CppExtension slimops._C (no CUDA: {reason})")
        ext = CppExtension("slimops._C", cpp, extra_compile_args={"cxx": CXX_FLAGS})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
KERNEL_FAMILIES = find_packages("kernels")
setup(
    # The families in the top-level `kernels/` (Triton kernels + reference oracles) are
    # installed as slimops.kernels.<family>; `kernels/` itself is no package (it would shadow
    # PyPI's `kernels`, see slimops/kernels/__init__.py).
    packages=sorted({"slimops", *find_packages(include=["slimops", "slimops.*"])})
    + [f"slimops.kernels.{family}" for family in KERNEL_FAMILIES],
    package_dir={f"slimops.kernels.{family}": f"kernels/{family}" for family in KERNEL_FAMILIES},
    package_data={"slimops": ["assets/**/*", "models/*.py"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
