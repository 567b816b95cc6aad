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
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0.1.0"
    warning = [line for line in proc.stderr.splitlines() if line.startswith("slimops: WARNING")]
    assert len(warning) == 1 and "pip install --no-build-isolation ." in warning[0]
    assert sorted(ROOT.glob("slimops/_C*")) == so_before       # a built extension is left alone
