"""The CLI contract: prune -> save -> eval on a tiny saved model, and one-line errors for
bad input before any work (nothing written to --out)."""

import json

import pytest
import torch

from helpers import SAMPLE_TEXT, make_tiny_model, prune_argv
from slimops.cli import main


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(SAMPLE_TEXT * 20)
    return path


def test_prune_then_eval(saved_tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc = main(
        prune_argv(
            saved_tiny_model,
            text_file,
            0.3,
            8,
            32,
            "--out",
            out,
            "--json",
            tmp_path / "report.json",
        )
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "decoder params" in printed and "| layer |" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert abs(report["achieved_ratio"] - 0.3) <= 0.01
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    rc = main(
        [
            "eval",
            str(out),
            "--data",
            str(text_file),
            "--seqlen",
            "32",
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["ppl"] > 1 and result["params"] == report["total_params_after"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "1.5"], "outside (0, 1)"),
        (["--ratio", "0"], "outside (0, 1)"),
        (["--calib", "/nonexistent/file.txt"], "neither"),
        (["--nsamples", "100000"], "fewer than nsamples x seqlen"),
        (["--schedule", "quadratic"], "--schedule must be"),
        (["--method", "magnitude", "--align", "8"], "slimgpt and search only"),
        (["--align", "0"], "positive integer"),
    ],
)
def test_bad_input_is_one_clear_line(saved_tiny_model, text_file, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    base = prune_argv(saved_tiny_model, text_file, None, 4, 32, "--out", out)
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and sum("error" in line for line in err) == 1
    assert not out.exists()


def test_missing_model_and_nonempty_out(tmp_path, text_file, saved_tiny_model, capsys):
    assert (
        main(
            [
                "prune",
                str(tmp_path / "nope"),
                "--calib",
                str(text_file),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert (
        main(["prune", str(saved_tiny_model), "--calib", str(text_file), "--out", str(busy)]) == 2
    )
    assert "not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "name, value",
    [
        ("model.layers.0.mlp.down_proj.weight", float("inf")),  # corrupt weights
        ("model.layers.0.post_attention_layernorm.weight", 1e38),  # activations overflow
    ],
)
def test_nonfinite_activations_are_reported(
    saved_tiny_model, text_file, tmp_path, capsys, name, value
):
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(saved_tiny_model / "model.safetensors")
    weights[name] = torch.full_like(weights[name], value)
    save_file(weights, saved_tiny_model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o"
    assert main(prune_argv(saved_tiny_model, text_file, None, 4, 32, "--out", out)) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not out.exists()


def test_prune_aligned_and_baseline(saved_tiny_model, text_file, tmp_path):
    """--align 8 keeps every FFN width a multiple of 8 (or dense) and whole KV groups; a
    baseline goes through the same CLI path; both hit the ratio within a point."""
    for name, extra in (("aligned", ["--align", "8"]), ("flap", ["--method", "flap"])):
        out = tmp_path / name
        json_out = tmp_path / f"{name}.json"
        argv = prune_argv(saved_tiny_model, text_file, 0.3, 8, 32, "--out", out, "--json", json_out)
        assert main(argv + extra) == 0
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert abs(report["achieved_ratio"] - 0.3) <= 0.01
        if name == "aligned":
            for shape in report["layer_shapes"]:
                assert shape["intermediate_size"] % 8 == 0 or shape["intermediate_size"] == 160
                assert shape["num_attention_heads"] == 2 * shape["num_key_value_heads"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert sum("error" in line for line in err) == 1, err
    return err[-1]


def test_unsupported_family_is_said_first(tmp_path, text_file, capsys):
    """A GPT-2 folder without a tokenizer: the family is refused before the tokenizer is
    looked for (not "the calibration text has 0 tokens")."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        folder
    )
    assert (
        main(["prune", str(folder), "--calib", str(text_file), "--out", str(tmp_path / "o")]) == 2
    )
    line = _one_error_line(capsys)
    assert "unsupported model family 'gpt2'" in line and "llama" in line


def test_folder_without_tokenizer_is_said(tmp_path, text_file, capsys):
    folder = tmp_path / "no-tokenizer"
    make_tiny_model("llama").save_pretrained(folder)
    assert (
        main(["prune", str(folder), "--calib", str(text_file), "--out", str(tmp_path / "o")]) == 2
    )
    assert "has no tokenizer" in _one_error_line(capsys)


def test_truncated_safetensors_is_one_clear_line(saved_tiny_model, text_file, tmp_path, capsys):
    weights = saved_tiny_model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o"
    assert main(prune_argv(saved_tiny_model, text_file, None, 4, 32, "--out", out)) == 2
    line = _one_error_line(capsys)
    assert "unreadable" in line and "truncated or corrupt" in line and str(saved_tiny_model) in line
    assert not out.exists()


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_corrupt_model_json_names_the_file(saved_tiny_model, text_file, tmp_path, capsys, name):
    (saved_tiny_model / name).write_text('{"model_type": "llama",')  # cut short
    out = tmp_path / "o"
    assert main(prune_argv(saved_tiny_model, text_file, None, 4, 32, "--out", out)) == 2
    line = _one_error_line(capsys)
    assert f"{saved_tiny_model / name}: not valid JSON (line 1, column 24" in line, line
    assert not out.exists()


def test_json_tokenizer_that_is_no_tokenizer_is_one_line(
    saved_tiny_model, text_file, tmp_path, capsys
):
    (saved_tiny_model / "tokenizer.json").write_text('{"version": "1.0"}')
    assert main(prune_argv(saved_tiny_model, text_file, None, 4, 32, "--out", tmp_path / "o")) == 2
    assert f"cannot build the tokenizer of {saved_tiny_model}" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a torch file", "not a tensor file written by torch.save (UnpicklingError"),
        ({"ids": [1, 2]}, "holds a dict, not a tensor of token ids"),
        (torch.rand(4096), "holds torch.float32 values, not integer token ids"),
        (torch.full((4096,), 10**6), "holds token id 1000000, outside the tokenizer's ids 0.."),
        (torch.full((4096,), -1), "holds token id -1, outside"),
    ],
)
def test_bad_calibration_ids_are_one_line(saved_tiny_model, tmp_path, capsys, content, message):
    ids = tmp_path / "ids.pt"
    if isinstance(content, bytes):
        ids.write_bytes(content)
    else:
        torch.save(content, ids)
    out = tmp_path / "o"
    assert main(prune_argv(saved_tiny_model, ids, None, 4, 32, "--out", out)) == 2
    assert f"{ids}: {message}" in _one_error_line(capsys)
    assert not out.exists()


def test_good_calibration_ids_prune(saved_tiny_model, tmp_path):
    ids = tmp_path / "ids.pt"
    torch.save(torch.randint(0, 200, (4, 64), dtype=torch.int32), ids)  # any integer dtype, 2-D
    assert main(prune_argv(saved_tiny_model, ids, None, 4, 32, "--out", tmp_path / "o")) == 0


def test_prune_with_search_writes_pareto_front(saved_tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "searched"
    assert (
        main(
            prune_argv(saved_tiny_model, text_file, 0.3, 8, 32, "--method", "search")
            + ["--out", str(out), "--generations", "2", "--population", "6", "--mutations", "3"]
            + ["--crossovers", "1", "--parents", "3", "--fitness", "kl", "--budget", "macs"]
            + ["--json", str(tmp_path / "r.json")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "search: " in printed and "candidates in" in printed
    assert (out / "search_pareto.png").read_bytes()[:4] == b"\x89PNG"
    plan = json.loads((out / "slimops_plan.json").read_text())
    assert plan["method"] == "search" and plan["info"]["budget"] == "macs"
    assert abs(plan["info"]["macs_removed"] - 0.3) <= 0.01
    assert plan["info"]["pareto_macs"] and len(plan["info"]["generations"]) == 2
