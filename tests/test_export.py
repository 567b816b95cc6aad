"""`slimops export --to gguf`: the file read back with gguf's own reader (fast tier), then run
in llama.cpp itself through llama-cpp-python (the engine tier: same next-token logits as
transformers for every family, uniform and per-layer pruned, f32 / f16 / q8_0)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from helpers import make_tiny_model, make_tiny_tokenizer, random_gqa_plan
from slimops import cli
from slimops.checkpoint import save_pruned
from slimops.evaluation import llamacpp
from slimops.export import export_gguf
from slimops.export.layout import choose_layout, pad_layer, rope_permute
from slimops.models import get_adapter
from slimops.models.base import Widths
from slimops.slicing import apply_plan, drop_layers, slice_hidden

gguf = pytest.importorskip("gguf")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
IDS = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer(300)  # 300: room for merges (llama.cpp refuses a BPE without)


def tiny(family, pruned=False, **overrides):
    model = make_tiny_model(family, layers=3, perturb=True, vocab_size=320, **overrides)
    if pruned:
        apply_plan(model, random_gqa_plan(model))
    return model


def hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# --- which graph ---------------------------------------------------------------------------


def test_layout_choice():
    dense, cut = Widths(4, 2, 160), Widths(2, 1, 100)
    assert choose_layout("llama", [dense] * 3, set(), 64, 16, False).arch == "llama"
    assert choose_layout("mistral", [cut] * 3, set(), 64, 16, False).arch == "llama"
    assert choose_layout("llama", [dense, cut, dense], set(), 64, 16, False).arch == "deci"
    # qwen2's graph builds wq / wo as hidden x hidden: a head-pruned uniform qwen2 is deci
    assert choose_layout("qwen2", [dense] * 2, {"q", "k", "v"}, 64, 16, False).arch == "qwen2"
    assert choose_layout("qwen2", [cut] * 2, {"q", "k", "v"}, 64, 16, False).arch == "deci"
    padded = choose_layout("qwen3", [Widths(4, 2, 90), Widths(3, 3, 160)], set(), 64, 16, True)
    assert (padded.arch, padded.padded) == ("qwen3", True)
    assert padded.widths == [Widths(6, 3, 160)] * 2  # 3 groups x 2 heads covers both layers
    with pytest.raises(ValueError, match="cannot export family 'bert'"):
        choose_layout("bert", [dense], set(), 64, 16, False)


def test_rope_permute_interleaves_halves_per_head():
    w = torch.arange(2 * 8).float()[:, None]  # 2 heads of head_dim 8
    out = rope_permute(w, 2)[:, 0].tolist()
    assert out[:8] == [0, 4, 1, 5, 2, 6, 3, 7]  # (x_i, x_{i+d/2}) pairs, as ggml's NORM rope
    assert out[8:] == [8, 12, 9, 13, 10, 14, 11, 15]


def test_padding_places_each_head_in_its_group():
    have, want, d = Widths(2, 2, 3), Widths(6, 3, 5), 1
    q = torch.tensor([[1.0], [2.0]])  # head 0 -> group 0, head 1 -> group 1 (rep 1)
    out = pad_layer(
        {"q": q, "k": torch.ones(2, 1), "o": torch.ones(1, 2), "down": torch.ones(1, 3)},
        have,
        want,
        d,
    )
    assert out["q"][:, 0].tolist() == [1, 0, 2, 0, 0, 0]  # slot g * rep + i, rep 2
    assert out["k"][:, 0].tolist() == [1, 1, 0]
    assert out["o"][0].tolist() == [1, 0, 1, 0, 0, 0]
    assert out["down"][0].tolist() == [1, 1, 1, 0, 0]


# --- the file, read back with gguf's reader ------------------------------------------------


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer")}
    return reader, fields


def test_reader_sees_every_tensor_with_its_values(tmp_path, tokenizer):
    model = tiny("llama", pruned=True)
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, "f32", tokenizer=tokenizer)
    reader, fields = _read(path)
    a = get_adapter(model)
    widths = [a.layer_shape(layer) for layer in a.layers()]
    assert report["arch"] == fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [w.heads for w in widths]
    assert fields["deci.attention.head_count_kv"] == [w.kv_heads for w in widths]
    assert fields["deci.feed_forward_length"] == [w.ffn for w in widths]
    assert fields["deci.attention.key_length"] == 16
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    layer = a.layers()[1]
    expect = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "output.weight": model.lm_head.weight,
        "output_norm.weight": model.model.norm.weight,
        "blk.1.attn_q.weight": rope_permute(layer.self_attn.q_proj.weight, widths[1].heads),
        "blk.1.attn_k.weight": rope_permute(layer.self_attn.k_proj.weight, widths[1].kv_heads),
        "blk.1.attn_v.weight": layer.self_attn.v_proj.weight,
        "blk.1.attn_output.weight": layer.self_attn.o_proj.weight,
        "blk.1.ffn_down.weight": layer.mlp.down_proj.weight,
        "blk.1.ffn_norm.weight": layer.post_attention_layernorm.weight,
    }
    for name, want in expect.items():
        assert torch.equal(tensors[name], want.detach()), name
    assert len(tensors) == 3 + 9 * 3
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left


def test_q8_0_keeps_unaligned_rows_in_f16(tmp_path, tokenizer):
    model = tiny("llama")  # FFN widths 128 and 96 are whole blocks of 32, 100 is not
    plan = random_gqa_plan(model)
    for layer, width in zip(plan.layers, (128, 96, 100)):
        layer.kept_channels = list(range(width))
    apply_plan(model, plan)
    report = export_gguf(model, tmp_path / "q.gguf", "q8_0", tokenizer=tokenizer)
    assert report["f16_fallback"] == ["blk.2.ffn_down.weight"]  # 96 rows are 3 blocks
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(report["file"]).tensors}
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["blk.2.ffn_down.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_hf_tokenizer_pre_names():
    from slimops.export.vocab import LLAMA3_REGEX, QWEN2_REGEX, _pre_name

    byte = {"type": "ByteLevel", "use_regex": False}
    assert _pre_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    split = {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}}
    assert _pre_name({"type": "Sequence", "pretokenizers": [split, byte]}) == "llama-bpe"
    split = {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}}
    assert _pre_name({"type": "Sequence", "pretokenizers": [split, byte]}) == "qwen2"
    digits = {"type": "Digits", "individual_digits": True}
    seq = [digits, {"type": "ByteLevel", "use_regex": True}]
    assert _pre_name({"type": "Sequence", "pretokenizers": seq}) == "smollm"
    assert _pre_name({"type": "Metaspace"}) is None


# --- bad input: one line, nothing written ---------------------------------------------------


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tokenizer, capsys):
    model = tiny("llama")
    with pytest.raises(ValueError, match="--dtype 'q4'"):
        export_gguf(model, tmp_path / "a.gguf", "q4", tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_gguf(model, tmp_path / "no" / "a.gguf", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="must end in .gguf"):
        export_gguf(model, tmp_path / "a.bin", tokenizer=tokenizer)
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_gguf(model, tmp_path / "b.gguf", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        export_gguf(tiny("llama", hidden_act="gelu"), tmp_path / "c.gguf", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        export_gguf(model, tmp_path / "c.gguf")
    with pytest.raises(ValueError, match="embedding has 320 rows"):  # another model's vocab
        export_gguf(model, tmp_path / "c.gguf", tokenizer_from=_tiny_gguf(tmp_path, tokenizer))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["export", str(empty), "--out", str(tmp_path / "d.gguf")]) == 2
    assert "no config.json" in capsys.readouterr().err
    no_weights = tmp_path / "no-weights"  # a config and a tokenizer, no weights
    make_tiny_model("llama").config.save_pretrained(no_weights)
    tokenizer.save_pretrained(no_weights)
    assert cli.main(["export", str(no_weights), "--out", str(tmp_path / "d.gguf")]) == 2
    assert "no file named model.safetensors" in capsys.readouterr().err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["b.gguf", "empty", "no-weights", "small.gguf"]  # no c/d, no temp file


def _tiny_gguf(tmp_path, tokenizer):
    small = make_tiny_model("llama", layers=1, vocab_size=304)
    return export_gguf(small, tmp_path / "small.gguf", "f32", tokenizer=tokenizer)["file"]


# --- the engine: llama.cpp itself ------------------------------------------------------------

# CI installs llama-cpp-python (.ci/run checks it imports), so these run there for real.
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python"
)

# Measured worst max |logit difference| / max |logit| over the 4 families, uniform and
# per-layer (2026-12-07, 2-core CPU): f32 4.8e-4, f16 8.6e-4, bf16 5.8e-3, q8_0 2.3e-2 (q8_0
# rounds each block of 32 weights to 8 bits).
TOLERANCE = {"f32": 2e-3, "f16": 4e-3, "bf16": 2e-2, "q8_0": 5e-2}


def assert_same_logits(path, model, dtype):
    got, want = llamacpp.logits(path, IDS), hf_logits(model)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= TOLERANCE[dtype] * scale, (dtype, path)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= (1.0 if dtype == "f32" else 0.9)


@needs_llama_cpp
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruned", [False, True], ids=["uniform", "per-layer"])
def test_llama_cpp_logits_equal_transformers(tmp_path, tokenizer, family, pruned):
    model = tiny(family, pruned)
    report = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tokenizer)
    want_arch = "llama" if family == "mistral" else family
    if pruned and family != "qwen3":
        want_arch = "deci"
    assert report["arch"] == want_arch and report["padded"] == (pruned and family == "qwen3")
    assert_same_logits(report["file"], model, "f32")


@needs_llama_cpp
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_llama_cpp_logits_f16_bf16_q8_0(tmp_path, tokenizer, dtype):
    model = tiny("qwen2", pruned=True)
    report = export_gguf(model, tmp_path / "m.gguf", dtype, tokenizer=tokenizer)
    assert_same_logits(report["file"], model, dtype)


@needs_llama_cpp
@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_word_embeddings": True},
        {"head_dim": 24},  # head_dim != hidden / heads
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
        {"rms_norm_eps": 1e-3},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        {
            "rope_parameters": {
                "rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ],
    ids=["tied", "head_dim", "theta", "eps", "linear", "llama3"],
)  # fmt: skip
def test_llama_cpp_hyper_parameters(tmp_path, tokenizer, overrides):
    model = tiny("llama", pruned=True, **overrides)
    report = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tokenizer)
    assert_same_logits(report["file"], model, "f32")


@needs_llama_cpp
def test_llama_cpp_sheared_shape(tmp_path, tokenizer):
    """Dropped layers and a sliced hidden size (what sheared writes) export as they are."""
    model = tiny("llama", pruned=False)
    adapter = get_adapter(model)
    drop_layers(model, adapter, [1])
    slice_hidden(model, adapter, torch.arange(0, 64, 2)[:-1])  # 31 of 64 dims
    report = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tokenizer)
    assert report["layers"] == [[4, 2, 160]] * 2
    assert_same_logits(report["file"], model, "f32")


@needs_llama_cpp
def test_mistral_sliding_window_caps_the_context(tmp_path, tokenizer):
    model = tiny("mistral", sliding_window=64)
    report = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tokenizer)
    assert _read(report["file"])[1]["llama.context_length"] == 64
    assert "sliding window 64" in report["notes"][0]
    assert_same_logits(report["file"], model, "f32")  # 24 tokens: inside the window


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_transformers(tmp_path, tokenizer):
    path = export_gguf(tiny("llama"), tmp_path / "m.gguf", "f32", tokenizer=tokenizer)["file"]
    text = "The quick brown fox. def f(x):\n\treturn x ** 2  # 3.14 naïve"
    assert llamacpp.tokenize(path, text) == tokenizer(text)["input_ids"]


@needs_llama_cpp
def test_gguf_in_gguf_out_copies_the_tokenizer(tmp_path, tokenizer):
    """A .gguf MODEL (read by transformers) re-exports with its own tokenizer keys copied."""
    src = export_gguf(tiny("llama"), tmp_path / "src.gguf", "f32", tokenizer=tokenizer)["file"]
    report = export_gguf(src, tmp_path / "out.gguf", "f16")
    tok = {k: f.contents() for k, f in gguf.GGUFReader(src).fields.items() if "tokenizer" in k}
    out = {k: f.contents() for k, f in gguf.GGUFReader(report["file"]).fields.items()}
    assert all(out[k] == v for k, v in tok.items())
    np.testing.assert_allclose(
        llamacpp.logits(report["file"], IDS), llamacpp.logits(src, IDS), atol=2e-2
    )


@needs_llama_cpp
def test_cli_export_and_llama_cpp_bench(tmp_path, tokenizer, capsys):
    dense, pruned = tiny("llama"), tiny("llama", pruned=True)
    for name, model in (("dense", dense), ("pruned", pruned)):
        save_pruned(model, tmp_path / name, tokenizer)
        argv = ["export", str(tmp_path / name), "--out", str(tmp_path / f"{name}.gguf")]
        assert cli.main(argv + ["--dtype", "q8_0", "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "architecture deci" in out and "kept in f16" in out
    assert json.loads((tmp_path / "r.json").read_text())["arch"] == "deci"
    files = [str(tmp_path / "dense.gguf"), str(tmp_path / "pruned.gguf")]
    argv = ["bench", "--engine", "llama.cpp", *files, "--threads", "1", "--gen", "4"]
    argv += ["--prompt", "16", "--repeats", "1", "--json", str(tmp_path / "b.json")]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert [r["model"] for r in result["rows"]] == files
    assert result["rows"][0]["decode_x"] == 1.0 and result["rows"][1]["decode_tok_s"] > 0
    assert "speedup decode" in capsys.readouterr().out


@needs_llama_cpp
def test_llama_cpp_flap_biases(tmp_path, tokenizer):
    """FLAP folds removed channels into o_proj / down_proj biases LLaMA lacks: written as
    llama.cpp's optional attn_output.bias / ffn_down.bias (deci graph), same logits."""
    from slimops.pipeline import prune_model

    model = tiny("llama")
    calib = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    prune_model(model, calib, "flap", 0.5)
    adapter = get_adapter(model)
    biased = set()
    for i, layer in enumerate(adapter.layers()):
        for name, linear in (
            ("attn_output", adapter.o_proj(layer)),
            ("ffn_down", adapter.down_proj(layer)),
        ):
            if linear.bias is not None:
                biased.add(f"blk.{i}.{name}.bias")
    assert any("attn_output" in n for n in biased) and any("ffn_down" in n for n in biased)
    report = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=tokenizer)
    names = {t.name for t in gguf.GGUFReader(report["file"]).tensors}
    assert biased <= names
    assert_same_logits(report["file"], model, "f32")
