"""benchmarks/common.py and the three kernel benchmarks on tiny CPU shapes: the one timer
(restoring in-place inputs untimed, on the CPU path and on do_bench's protocol), the table
and JSON writer, each bench end to end through main(argv), and the competing load's
processes, which must be running while it lasts and gone after, also after an error."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from helpers import ROOT, load_benchmark

common = load_benchmark("common")

ROW_KEYS = {
    "backend",
    "ms",
    "tflops",
    "pct_peak_flops",
    "gbs",
    "pct_peak_bw",
    "flops",
    "bytes",
    "load",
}


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (exited, its new parent has not reaped it) is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- the timer ------------------------------------------------------------------------------
def test_timer_returns_a_positive_median():
    assert 0 < common.median_seconds(lambda: sum(range(100)), repeats=3, device="cpu") < 0.5


def in_place_problem(restore_seconds=0.0):
    """(fn, restore, log): fn fails unless restore() ran since its last call, as an in-place
    op fed its own output would."""
    state, log = {"fresh": False}, {"calls": 0, "restores": 0}

    def fn():
        assert state["fresh"], "called on its own output"
        state["fresh"] = False
        log["calls"] += 1

    def restore():
        time.sleep(restore_seconds)
        state["fresh"] = True
        log["restores"] += 1

    return fn, restore, log


def test_timer_restores_before_every_call_and_does_not_time_it():
    fn, restore, log = in_place_problem(restore_seconds=0.02)
    t = common.median_seconds(fn, repeats=3, restore=restore, device="cpu")
    assert t < 0.01 and log["calls"] == 9 and log["restores"] == 9  # 2 warm-ups + 1 timed, x3


def test_gpu_timer_restores_through_do_bench_hook(monkeypatch):
    """do_bench's calling protocol (triton.testing): one call, 5 estimate calls and warm-ups
    with no hook, then `x.grad = None` for x in grad_to_none before each timed call. Fewer
    samples than `repeats` (a long kernel): a second do_bench sized for the rest."""
    import triton.testing

    fn, restore, log = in_place_problem()
    reps = []

    def fake_do_bench(call, warmup, rep, grad_to_none, return_mode):
        reps.append(rep)
        for _ in range(1 + 5 + 3):
            call()
        for _ in range(4):
            for x in grad_to_none:
                x.grad = None
            restores = log["restores"]
            call()
            assert log["restores"] == restores  # no restore inside the timed call
        return [1.0, 2.0, 2.0, 3.0] if return_mode == "all" else 0.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert common.median_seconds(fn, repeats=6, restore=restore, device="cuda") == 2e-3
    assert reps == [100, 2 * 2 * 3.0] and log["calls"] == 2 * 13


# ---- table and JSON writer ------------------------------------------------------------------
def test_markdown_table_and_json_round_trip(tmp_path):
    rows = [
        {"case": "a", "backend": "cpp", "ms": 1.5, "tflops": None, "vs_torch": 2.0, "flops": 7},
        {"case": "b c", "backend": "torch", "ms": 0.25, "tflops": 3.0, "vs_torch": 1.0, "flops": 9},
    ]
    lines = common.markdown_table(rows, common.table_columns(rows)).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["case", "backend", "median ms", "TFLOP/s", "vs torch"]  # no raw counts
    assert cells[1] == ["---", "---", "---:", "---:", "---:"]
    assert cells[2:] == [
        ["a", "cpp", "1.5", "n/a", "2.00x"],
        ["b c", "torch", "0.25", "3", "1.00x"],
    ]
    payload = {"device": "cpu", "rows": rows}
    common.write_json(tmp_path / "out.json", payload)
    assert json.loads((tmp_path / "out.json").read_text()) == payload


# ---- the three kernel benches end to end ---------------------------------------------------
BENCHES = {
    "bench_hessian": (
        ["--T", "64", "--d", "16", "24", "--dtype", "bf16"],
        {"dtype", "T", "d"},
        {"torch"},
        2,
    ),
    "bench_obs": (
        ["--d", "32", "--r", "8", "--s", "4", "--scoring", "2", "8"],
        {"case"},
        {"torch"},
        3,
    ),
    "bench_slice_gemm": (
        ["--shape", "24", "256", "--prefill", "8", "--decode", "1"],
        {"mode", "phase", "T", "dtype"},
        {"dense", "gather"},
        6,
    ),
}


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_runs_end_to_end_and_writes_json(name, tmp_path, capsys):
    argv, keys, baselines, n_cases = BENCHES[name]
    out = tmp_path / "out.json"
    load_benchmark(name).main([*argv, "--backends", "cpp", "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert {
        "device",
        "torch",
        "slimops_backends",
        "competing_load",
        "args",
        "notes",
        "rows",
    } <= set(report)
    kernels = {"cpp"} if report["slimops_backends"]["cpu"].startswith("C++") else set()
    rows = report["rows"]
    assert len(rows) == n_cases * len(baselines | kernels)
    assert {r["backend"] for r in rows} == baselines | kernels
    for row in rows:
        assert set(row) == keys | ROW_KEYS | {f"vs_{b}" for b in baselines}
        assert row["ms"] > 0 and row["load"] == "none" and row["pct_peak_flops"] is None
    assert all(r[f"vs_{r['backend']}"] == 1.0 for r in rows if r["backend"] in baselines)
    printed = capsys.readouterr().out
    assert printed.startswith("device: CPU") and "competing load: none" in printed
    assert printed.count("\n| ") == 1 + len(rows)  # header + one line per row


def test_kernel_backends_drop_baselines_and_what_cannot_run_here():
    names = common.kernel_backends("slice_gemm", ["torch", "cuda", "cpp"], device="cpu")
    assert "torch" not in names and "cuda" not in names


# ---- the competing load ---------------------------------------------------------------------
def test_competing_load_runs_its_processes_and_kills_them_after():
    with common.competing_load(2) as pids:
        assert len(pids) == 2 and all(map(alive, pids))
        assert all(b"ready" in open(f"/proc/{pid}/cmdline", "rb").read() for pid in pids)
    assert not any(map(alive, pids))


def test_competing_load_is_cleaned_up_after_an_error():
    with pytest.raises(KeyboardInterrupt):
        with common.competing_load(1) as pids:
            raise KeyboardInterrupt
    assert pids and not alive(pids[0])


def test_competing_load_ends_itself_when_the_benchmark_is_killed():
    """SIGKILL runs no cleanup: each child leaves its loop once its parent is gone."""
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import common\n"
        "with common.competing_load(1) as pids:\n    print(*pids, flush=True); time.sleep(60)"
    )
    bench = subprocess.Popen(
        [sys.executable, "-c", script, str(ROOT / "benchmarks")], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(bench.stdout.readline())
        assert alive(child)
    finally:
        bench.kill()
        bench.wait()
        bench.stdout.close()
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_competing_load_that_cannot_start_says_why(monkeypatch):
    monkeypatch.setitem(common.LOADS, "broken", ("raise SystemExit('no torch here')", "pass"))
    with pytest.raises(RuntimeError, match="did not start: no torch here"):
        with common.competing_load(1, "broken"):
            pass


def test_bench_hessian_with_a_competing_load(tmp_path, capsys):
    out = tmp_path / "h.json"
    load_benchmark("bench_hessian").main(
        [
            "--T",
            "64",
            "--d",
            "16",
            "--backends",
            "cpp",
            "--repeats",
            "1",
            "--competing-load",
            "1",
            "--json",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    load = report["competing_load"]
    assert load["processes"] == 1 and load["kind"] == "busy" and not alive(load["pids"][0])
    assert {r["load"] for r in report["rows"]} == {"1 busy"}
    assert "competing load: 1 busy process(es) during every timed call" in capsys.readouterr().out
