"""Data-parallel calibration under torchrun (2 gloo processes on CPU) gives the same plan and
the same weights (within 1e-5) as one process with all the samples, for every data-driven
method; the CLI says how the samples are split and rank 0 alone writes the checkpoint."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, SAMPLE_TEXT, prune_argv, torchrun

METHODS = ("slimgpt", "wanda-sp", "flap", "taylor")
SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from helpers import make_tiny_model
from slimops import distributed
from slimops.pipeline import prune_model
distributed.init_from_env()
results = {{}}
for method in {methods!r}:
    model = make_tiny_model("llama", layers=3, perturb=True)
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    plan, report = prune_model(model, tokens, method, 0.4, batch_size=2)
    results[method] = {{"plan": [vars(lp) for lp in plan.layers], "state": model.state_dict(),
                       "split": report.info["calibration_split"]}}
if distributed.is_main():
    torch.save(results, {out!r})
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    results = {}
    for name, launch in (("one", None), ("two", torchrun)):
        script = tmp / f"{name}.py"
        script.write_text(
            SCRIPT.format(tests=str(ROOT / "tests"), methods=METHODS, out=str(tmp / f"{name}.pt"))
        )
        if launch is None:
            proc = subprocess.run(
                [sys.executable, str(script)], capture_output=True, text=True, timeout=600
            )
        else:
            proc = launch([str(script)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = torch.load(tmp / f"{name}.pt", weights_only=False)
    return results


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process(runs, method):
    one, two = runs["one"][method], runs["two"][method]
    assert two["plan"] == one["plan"]
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, atol=1e-5, rtol=1e-5, msg=key)
    assert one["split"] == "calibrating on samples 0-7"
    assert two["split"] == "world size 2: rank 0 calibrates on samples 0-3"


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
        ]
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
