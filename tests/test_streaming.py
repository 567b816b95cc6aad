"""--stream: pruning one layer in memory at a time from safetensors shards gives the same
plan and the same model as pruning in memory, never holds two layers, writes a checkpoint
stock transformers loads, resumes, and refuses what it cannot do with one clear line."""

import copy
import json

import pytest
import torch

from helpers import SAMPLE_TEXT, make_tiny_model, make_tiny_tokenizer, prune_argv
from slimops import checkpoint, streaming
from slimops.cli import main
from slimops.pipeline import prune_model


def calib(n=8, seqlen=32):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def sharded(tmp_path):
    """A tiny model saved in many small shards (several per layer)."""

    def make(family):
        model = make_tiny_model(family, layers=3, perturb=True)
        model.save_pretrained(tmp_path / family, max_shard_size="60KB")
        make_tiny_tokenizer().save_pretrained(tmp_path / family)
        return model, tmp_path / family

    return make


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_equals_in_memory_and_reloads(sharded, tmp_path, family, monkeypatch):
    from transformers import AutoModelForCausalLM

    model, folder = sharded(family)
    assert (folder / "model.safetensors.index.json").is_file()
    opened = []
    real_open = streaming.ShardSource.open

    def open_one(self, i, layers, device):  # every other layer is on meta meanwhile
        assert all(p.is_meta for j, lay in enumerate(layers) if j != i for p in lay.parameters())
        opened.append(i)
        return real_open(self, i, layers, device)

    monkeypatch.setattr(streaming.ShardSource, "open", open_one)
    plan, report = streaming.prune_streamed(
        folder, calib(), tmp_path / "out", make_tiny_tokenizer(), "slimgpt", 0.4
    )
    ref = copy.deepcopy(model)
    plan_ref, report_ref = prune_model(ref, calib(), "slimgpt", 0.4)
    assert opened == [0, 1, 2] and plan.layers == plan_ref.layers
    assert report.decoder_params_after == report_ref.decoder_params_after
    ids = torch.randint(0, 256, (2, 10))
    for loaded in (
        checkpoint.load(tmp_path / "out")[0],
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True),
    ):
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_ranks_other_than_rank_0_write_nothing(sharded, tmp_path, monkeypatch):
    """Under torchrun every rank prunes the same layers; only rank 0 writes (before, the
    others wrote a whole copy of the model into a temp folder)."""
    model, folder = sharded("llama")
    monkeypatch.setattr(streaming, "is_main", lambda: False)
    monkeypatch.setattr(streaming, "save_file", lambda *a, **k: pytest.fail("a rank wrote"))
    plan, report = streaming.prune_streamed(folder, calib(), tmp_path / "out", None, "slimgpt", 0.4)
    plan_ref, report_ref = prune_model(copy.deepcopy(model), calib(), "slimgpt", 0.4)
    assert plan.layers == plan_ref.layers and not (tmp_path / "out").exists()
    assert report.decoder_params_after == report_ref.decoder_params_after


def test_cli_stream_with_resume(sharded, tmp_path):
    _, folder = sharded("llama")
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT * 20)
    base = prune_argv(folder, text)
    assert main(base + ["--out", str(tmp_path / "mem"), "--json", str(tmp_path / "a.json")]) == 0
    assert (
        main(
            base
            + [
                "--out",
                str(tmp_path / "str"),
                "--stream",
                "--resume",
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["layer_shapes"] == b["layer_shapes"] and b["info"]["streamed"]
    assert not (tmp_path / "str.progress").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "flap"], "--stream supports slimgpt"),
        (["--schedule", "obs"], "--stream supports slimgpt"),
    ],
)
def test_stream_refuses_what_it_cannot_do(sharded, tmp_path, capsys, extra, message):
    _, folder = sharded("llama")
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT * 20)
    assert (
        main(
            [
                "prune",
                str(folder),
                "--calib",
                str(text),
                "--out",
                str(tmp_path / "o"),
                "--stream",
                *extra,
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()
