"""scripts/gpu_check.sh, the one-shot GPU session script, checked on CPU: its dry run runs
every step on tiny shapes and leaves each step's JSON and log and the summary; a failing
step is recorded and the others still run; the budget stops steps from starting."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = [
    "env",
    "build",
    "tests",
    "e2e",
    "torchrun",
    "hessian",
    "obs",
    "slice_gemm",
    "shaped_7b",
    "prune_7b",
    "throughput",
    "bench_prune",
]
JSONS = ["hessian", "obs", "slice_gemm", "e2e", "throughput", "bench_prune"]


def run_script(tmp_path: Path, *args: str, timeout: int = 600, **env: str):
    """(completed process, out folder); scratch space under tmp_path, $OUT unset."""
    out = tmp_path / "out"
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir(exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if k != "OUT"}
    environ |= {"TMPDIR": str(scratch_parent), **env}
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=timeout,
    )
    return proc, out


def summary_steps(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["steps"]


def log_names(out: Path) -> set[str]:
    with tarfile.open(out / "logs.tar.gz") as tar:
        return set(tar.getnames())


def test_dry_run_runs_every_step_and_writes_its_files(tmp_path):
    proc, out = run_script(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = summary_steps(out)
    assert [s["step"] for s in steps] == STEPS
    assert all(s["status"] == "ok" for s in steps), steps
    # what the device tool returns: at most 8 files, here exactly these
    files = {p.name for p in out.iterdir()}
    assert files == {f"{name}.json" for name in JSONS} | {"summary.json", "logs.tar.gz"}
    for name in JSONS:
        assert json.loads((out / f"{name}.json").read_text()), name
    assert json.loads((out / "e2e.json").read_text())["ok"]
    assert {f"logs/{step}.log" for step in STEPS} <= log_names(out)
    assert "logs/prune_7b_slimgpt.json" in log_names(out)
    assert not any((tmp_path / "tmp").iterdir())  # the scratch models are removed
    # the last lines printed: the summary table, one row per step
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("== gpu_check summary"))
    assert "dry run" in lines[head]
    assert [line.split()[:2] for line in lines[head + 2 :]] == [[s, "ok"] for s in STEPS]


def test_failures_are_recorded_and_dependents_skipped(tmp_path):
    steps = "env,build,shaped_7b,prune_7b,throughput"
    proc, out = run_script(tmp_path, "--dry-run", "--steps", steps, PYTHON="false")
    assert proc.returncode == 1
    status = {s["step"]: s["status"] for s in summary_steps(out)}
    assert status == {
        "env": "ok",  # reports what it can and never fails
        "build": "fail",
        "shaped_7b": "fail",
        "prune_7b": "skip",
        "throughput": "skip",
    }
    assert {"logs/build.log", "logs/shaped_7b.log"} <= log_names(out)
    assert "needs shaped_7b" in proc.stdout


def test_budget_and_bad_options(tmp_path):
    proc, out = run_script(tmp_path, "--dry-run", "--steps", "env,hessian", "--budget", "5")
    assert proc.returncode == 1
    assert [s["status"] for s in summary_steps(out)] == ["skip", "skip"]
    assert "budget of 5 s spent" in proc.stdout
    proc, _ = run_script(tmp_path, "--steps", "nope")
    assert proc.returncode == 2 and "unknown step nope" in proc.stderr
