"""A plain `pip install .` (build isolation: torch not importable while setup.py runs)
installs the pure-Python package and says why the kernels are missing and what to run."""

import subprocess
import sys

from helpers import ROOT

# setup.py as pip's isolated build runs it, with torch unimportable.
WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = None          # `import torch` now raises ImportError
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_setup_without_torch_builds_pure_python_and_says_how_to_get_kernels():
    so_before = sorted(ROOT.glob("slimops/_C*"))
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0.1.0"
    warning = [line for line in proc.stderr.splitlines() if line.startswith("slimops: WARNING")]
    assert len(warning) == 1 and "pip install --no-build-isolation ." in warning[0]
    assert sorted(ROOT.glob("slimops/_C*")) == so_before  # a built extension is left alone


def test_missing_extension_is_said_once_at_import():
    """Installed without kernels (as a plain `pip install .` leaves it): importing slimops
    says so in one warning with the command; SLIMOPS_NO_EXT=1 (a deliberate choice) is quiet."""
    code = (
        "import sys; sys.modules['slimops._C'] = None\n"
        "import slimops.ops as o; print(o.backends()['cpu'])"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "SLIMOPS_NO_EXT"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "slimops._C is not available" in line]
    assert len(lines) == 1 and "pip install --no-build-isolation ." in lines[0]
    assert proc.stdout.startswith("python reference")
    quiet = subprocess.run(
        [sys.executable, "-c", "import slimops.ops"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "SLIMOPS_NO_EXT": "1"},
    )
    assert "not available" not in quiet.stderr


# Run from the repository root exactly as users do (`python -c`/`python -m` put the root first
# on sys.path). The top-level kernels/ folder must never be what `import kernels` finds: PyPI's
# `kernels` (a dependency of transformers >= 5.25) is imported by transformers' hub kernels.
FROM_ROOT = """
import importlib.metadata, importlib.util, pathlib, sys
folder = (pathlib.Path.cwd() / "kernels").resolve()
assert sys.path[0] in ("", str(pathlib.Path.cwd())), sys.path[:2]  # the root is searched first
spec = importlib.util.find_spec("kernels")
try:
    importlib.metadata.distribution("kernels")
    installed = True
except importlib.metadata.PackageNotFoundError:
    installed = False
if installed:  # the installed package, whatever the path order
    assert spec.origin and not pathlib.Path(spec.origin).resolve().is_relative_to(folder), spec
else:  # at most an empty namespace portion: no module of ours answers to `kernels`
    assert spec is None or spec.origin is None, spec
import slimops.kernels.common, slimops.kernels.hessian.reference as ref  # ours, by full name
assert pathlib.Path(ref.__file__).resolve().is_relative_to(folder), ref.__file__
from transformers.integrations import hub_kernels  # the import that broke (CUDAProperties)
print("ok", installed)
"""


def test_repository_root_on_sys_path_never_shadows_pypi_kernels():
    assert not (ROOT / "kernels" / "__init__.py").exists()  # no regular package at the root
    proc = subprocess.run(
        [sys.executable, "-c", FROM_ROOT], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split()[0] == "ok"


def test_readme_shows_every_command_ci_runs():
    """.ci/run installs and tests with the README's commands: each of its *_CMD lines must
    appear verbatim in README.md (a drift here means users install something CI never did)."""
    import re

    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^[A-Z]+_CMD='(.+)'$", ci, flags=re.M)
    assert len(commands) == 3, commands  # llama.cpp, install, test
    readme = (ROOT / "README.md").read_text()
    for command in commands:
        assert command in readme, command
