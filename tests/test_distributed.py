"""Data-parallel calibration under torchrun (2 gloo processes on CPU) gives the same plan and
the same saved checkpoint (weights within 1e-5, config, every file) as one process with all
the samples, for every data-driven method, on 9 samples that do not split evenly; the CLI says
how the samples are split and rank 0 alone writes the checkpoint."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, SAMPLE_TEXT, prune_argv, torchrun

# search: a short evolution whose fitness windows (5 of 9) and fresh batches are drawn over
# the global sample count; before the fix the ranks' draws went out of step and diverged
SEARCH = dict(
    generations=3,
    population=6,
    parents=2,
    mutations=2,
    crossovers=2,
    fitness_samples=5,
    fresh_batches=True,
    gradient_samples=7,
)
METHODS = {
    "slimgpt": {"gradient_samples": 7},
    "wanda-sp": {},
    "flap": {},
    "taylor": {},
    "search": SEARCH,
}
SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from helpers import make_tiny_model
from slimops import distributed
from slimops.checkpoint import save_pruned
from slimops.pipeline import prune_model
distributed.init_from_env()
results = {{}}
for method, options in {methods!r}.items():
    model = make_tiny_model("llama", layers=3, perturb=True)
    tokens = torch.randint(0, 256, (9, 32), generator=torch.Generator().manual_seed(0))
    plan, report = prune_model(model, tokens, method, 0.4, batch_size=2, **options)
    results[method] = {{"plan": [vars(lp) for lp in plan.layers],
                       "split": report.info["calibration_split"]}}
    if distributed.is_main():
        save_pruned(model, {out!r} + "/" + method, plan=plan, extra_info=report.info)
if distributed.is_main():
    torch.save(results, {out!r} + "/results.pt")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    results = {}
    for name, launch in (("one", None), ("two", torchrun)):
        script, out = tmp / f"{name}.py", tmp / name
        script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), methods=METHODS, out=str(out)))
        if launch is None:
            proc = subprocess.run(
                [sys.executable, str(script)], capture_output=True, text=True, timeout=600
            )
        else:
            proc = launch([str(script)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = torch.load(out / "results.pt", weights_only=False), out
    return results


def assert_same_json(a, b, where: str) -> None:
    """Equal JSON, numbers within 1e-5 (ranks sum in another order); timings, memory and the
    split line (checked apart) are skipped."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if "second" not in k and k not in ("peak_memory_mb", "calibration_split"):
                assert_same_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_json(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), (where, a, b)
    else:
        assert a == b, (where, a, b)


def assert_same_folder(one: Path, two: Path) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:
        a, b = one / name, two / name
        if name.endswith(".safetensors"):
            x, y = load_file(a), load_file(b)
            assert x.keys() == y.keys(), name
            for k in x:
                torch.testing.assert_close(y[k], x[k], atol=1e-5, rtol=1e-5, msg=f"{name} {k}")
        elif name.endswith(".json"):
            assert_same_json(json.loads(a.read_text()), json.loads(b.read_text()), name)
        else:
            assert a.read_bytes() == b.read_bytes(), name


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process(runs, method):
    (one, one_dir), (two, two_dir) = runs["one"], runs["two"]
    assert two[method]["plan"] == one[method]["plan"]
    assert_same_folder(one_dir / method, two_dir / method)  # weights, config, plan, info
    assert one[method]["split"] == "calibrating on samples 0-8"
    assert two[method]["split"] == "world size 2: rank 0 calibrates on samples 0-3"


def test_cli_under_torchrun_says_the_split_and_rank0_saves(saved_tiny_model, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT * 20)
    out = tmp_path / "pruned"
    proc = torchrun(
        [
            "-m",
            "slimops.cli",
            *prune_argv(saved_tiny_model, text),
            "--out",
            str(out),
            "--json",
            str(tmp_path / "r.json"),
        ],
        rendezvous=True,  # docs/cli.md's several-machine command, on one node
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2: rank 0 calibrates on samples 0-3" in proc.stderr
    assert "world size 2: rank 1 calibrates on samples 4-7" in proc.stderr
    assert proc.stdout.count("saved to") == 1  # rank 0 alone writes and prints
    report = json.loads((tmp_path / "r.json").read_text())
    assert abs(report["achieved_ratio"] - 0.3) <= 0.01 and (out / "config.json").is_file()


# ---- collectives on the devices their backend takes (NCCL rejects CPU tensors) ---------------


def test_with_gpus_the_group_is_gloo_for_cpu_and_nccl_for_cuda(monkeypatch):
    """With NCCL alone, the CPU scalars methods sum (token counts, losses) stopped every
    multi-GPU run at its first collective; the group must route CPU tensors to gloo."""
    from slimops import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda b, **kw: chosen.append(b))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.init_from_env() and chosen == ["cpu:gloo,cuda:nccl"]
    chosen.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a 1-rank torchrun joins a group too (GPU check)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert distributed.init_from_env() and chosen == ["cpu:gloo,cuda:nccl"]


@pytest.fixture
def gloo_group_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_collectives_refuse_a_tensor_on_a_device_the_backend_rejects(
    gloo_group_of_one, monkeypatch
):
    """One helper owns the collective device: a tensor its backend cannot take fails with a
    one-line error naming the device, at every world size (NCCL refuses at size 1 too)."""
    import torch.distributed as dist

    from slimops import distributed

    t = torch.ones(3)
    assert torch.equal(distributed.all_sum(t), torch.ones(3))  # a CPU tensor on gloo: fine
    with pytest.raises(ValueError, match="got a meta tensor"):
        distributed.all_sum(torch.ones(3, device="meta"))
    # The old init (`nccl` alone on a GPU machine): the CPU tensors callers sum are refused.
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    with pytest.raises(ValueError, match="got a cpu tensor.*takes only cuda"):
        distributed.all_sum(torch.ones(3))
