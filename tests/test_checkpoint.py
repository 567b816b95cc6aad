"""Pruned checkpoints load with plain transformers (no slimops) and with slimops.load, give
the same logits, generations and token ids, and are written atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimops
from helpers import BLOCK_SLIMOPS, child_env, input_ids, logits, make_tiny_model, random_gqa_plan
from slimops import checkpoint
from slimops.models import get_adapter
from slimops.plan import LayerPlan, PruningPlan
from slimops.slicing import apply_plan

TEXTS = [
    "def prune(model, ratio=0.25):\n    return model  # 2024 tokens",
    "the  quick\tbrown fox 12345 jumps\n\nover 3.14",
]
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def assert_logits_close(got, want):
    # fp32: same kernels on the same weights. bf16: the in-process model was cast after
    # building (rotary buffers included), the reloaded one built in bf16: ~1 bf16 ulp.
    tol = 1e-5 if want.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def uniform_plan(model, heads, kv, channels) -> PruningPlan:
    return PruningPlan([LayerPlan(heads, kv, channels) for _ in model.model.layers])


# name -> (family, plan builder, dtype, per-layer remote code expected)
CASES = {
    "llama-mha": ("llama-mha", random_gqa_plan, torch.float32, True),
    "llama_gqa_bf16": ("llama", random_gqa_plan, torch.bfloat16, True),
    "mistral": ("mistral", random_gqa_plan, torch.float32, True),
    "qwen2": ("qwen2", random_gqa_plan, torch.float32, True),
    "qwen3": ("qwen3", random_gqa_plan, torch.float32, True),
    # same shape everywhere, accepted by Qwen2Config -> plain stock checkpoint
    "qwen2_uniform": (
        "qwen2",
        lambda m: uniform_plan(m, [0, 3], [0, 1], list(range(64))),
        torch.float32,
        False,
    ),
    # same shape everywhere, but LlamaConfig refuses 64 % 3 heads -> still remote code
    "llama_uniform_3heads": (
        "llama-mha",
        lambda m: uniform_plan(m, [0, 1, 3], [0, 1, 3], list(range(80))),
        torch.float32,
        True,
    ),
    # FLAP-style biases the stock family lacks: always remote code, even for a shape
    # (qwen2_uniform's) that would otherwise be a stock checkpoint
    "llama_extra_bias": ("llama", random_gqa_plan, torch.float32, True),
    "qwen2_extra_bias": (
        "qwen2",
        lambda m: uniform_plan(m, [0, 3], [0, 1], list(range(64))),
        torch.float32,
        True,
    ),
}
# case -> roles given a random bias after slicing (as FLAP's bias compensation does)
EXTRA_BIASES = {"llama_extra_bias": ("o", "down"), "qwen2_extra_bias": ("down",)}


@torch.no_grad()
def add_biases(model, roles, seed=0):
    """Replace each layer's `roles` projections by copies with a random bias."""
    adapter, g = get_adapter(model), torch.Generator().manual_seed(seed)
    for layer in adapter.layers():
        for role in roles:
            old = adapter.linear(layer, role)
            new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            new.weight.copy_(old.weight)
            new.bias.copy_(0.1 * torch.randn(old.out_features, generator=g))
            adapter.set_linear(layer, role, new)
    return model


def expected_shapes(name, model):
    """Per-layer shapes config.json must record for case `name`."""
    extra = {f"{role}_proj_bias": True for role in EXTRA_BIASES.get(name, ())}
    return [
        {
            **dict(
                zip(
                    ("num_attention_heads", "num_key_value_heads", "intermediate_size"),
                    get_adapter(model).layer_shape(layer),
                )
            ),
            **extra,
        }
        for layer in model.model.layers
    ]


def build_tokenizer():
    """Byte-level BPE trained here, wrapped the way users wrap their own tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        TEXTS * 20, trainers.BpeTrainer(vocab_size=128, special_tokens=["<s>", "</s>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case sliced, saved with tokenizer and plan; plus what it computed in-process."""
    root, tok = tmp_path_factory.mktemp("ckpts"), build_tokenizer()
    out = {}
    for name, (family, make_plan, dtype, _) in CASES.items():
        model = make_tiny_model(family, perturb=True)
        plan = make_plan(model)
        add_biases(apply_plan(model, plan), EXTRA_BIASES.get(name, ())).to(dtype)
        path = slimops.save_pruned(
            model, root / name, tokenizer=tok, plan=plan, extra_info={"case": name}
        )
        out[name] = dict(
            path=path,
            model=model,
            plan=plan,
            logits=logits(model),
            gen=model.generate(input_ids(), **GEN),
        )
    return out, {t: tok(t)["input_ids"] for t in TEXTS}


# Runs where slimops cannot be imported: only the checkpoint folder and transformers.
CHILD = (
    BLOCK_SLIMOPS
    + r"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
spec = json.loads(sys.stdin.read())
ids = torch.tensor(spec["ids"])
gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
results = {}
for name, case in spec["cases"].items():
    path, remote = case["path"], case["remote"]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote)
    r = results[name] = {"class": type(model).__name__, "dtype": str(model.dtype)}
    with torch.no_grad():
        r["logits"] = model(ids).logits.float().tolist()
    r["gen"] = model.generate(ids, **gen).tolist()
    r["gen_static"] = model.generate(ids, cache_implementation="static", **gen).tolist()
    r["gen_static_chunked"] = model.generate(ids, cache_implementation="static",
                                             prefill_chunk_size=4, **gen).tolist()
    for trust in (False, True):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        r[f"tok_{trust}"] = {"class": type(tok).__name__,
                             "ids": [tok(t)["input_ids"] for t in spec["texts"]],
                             "decoded": [tok.decode(tok(t)["input_ids"]) for t in spec["texts"]]}
    if remote:   # without remote code the stock class must refuse, not load silently
        try:
            AutoModelForCausalLM.from_pretrained(path)
            r["plain_load"] = "loaded"
        except Exception as e:
            r["plain_load"] = type(e).__name__
print(json.dumps(results))
"""
)


@pytest.fixture(scope="module")
def child(saved, tmp_path_factory):
    """One fresh interpreter (no slimops) loads every checkpoint: imports cost seconds."""
    cases, _ = saved
    spec = {
        "ids": input_ids().tolist(),
        "texts": TEXTS,
        "cases": {n: {"path": str(c["path"]), "remote": CASES[n][3]} for n, c in cases.items()},
    }
    home = tmp_path_factory.mktemp("child_home")
    env = child_env(home)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(spec),
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CASES)
def test_loads_without_slimops(name, saved, child):
    case, got = saved[0][name], child[name]
    remote = CASES[name][3]
    assert got["class"] == ("SlimopsForCausalLM" if remote else type(case["model"]).__name__)
    assert got["dtype"] == str(CASES[name][2])
    assert_logits_close(torch.tensor(got["logits"]), case["logits"])
    want_gen = case["gen"].tolist()
    assert got["gen"] == want_gen
    # Static cache allocates per layer from the keys it sees, so per-layer KV counts work;
    # with prefill_chunk_size it pre-allocates, and the remote class gives per-layer counts.
    assert got["gen_static"] == want_gen and got["gen_static_chunked"] == want_gen
    if remote:
        assert got["plain_load"] == "RuntimeError"  # size mismatch, never silent


@pytest.mark.parametrize("name", CASES)
def test_tokenizer_ids_survive_reload(name, saved, child):
    want = saved[1]
    for trust in ("False", "True"):
        tok = child[name][f"tok_{trust}"]
        assert tok["ids"] == list(want.values()), (trust, tok["class"])
        assert tok["decoded"] == TEXTS


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_files(name, saved):
    case, remote = saved[0][name], CASES[name][3]
    path = case["path"]
    config = json.loads((path / "config.json").read_text())
    assert ("auto_map" in config) == remote
    shapes = expected_shapes(name, case["model"])
    if remote:
        assert (
            config["slimops_layers"] == shapes
            and config["model_type"] == config["slimops_base_model_type"]
        )
    else:
        assert {k: config[k] for k in shapes[0]} == shapes[0] and "slimops_layers" not in config
    assert PruningPlan.from_json((path / "slimops_plan.json").read_text()) == case["plan"]
    assert json.loads((path / "slimops_info.json").read_text()) == {"case": name}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


@pytest.mark.parametrize(
    "name", ["llama_gqa_bf16", "qwen2", "qwen2_uniform", "llama_extra_bias", "qwen2_extra_bias"]
)
def test_slimops_load(name, saved):
    case = saved[0][name]
    model, tok = slimops.load(case["path"])
    assert model.dtype == CASES[name][2]
    assert_logits_close(logits(model), case["logits"])
    assert [tok(t)["input_ids"] for t in TEXTS] == list(saved[1].values())
    assert [get_adapter(model).layer_shape(lay) for lay in model.model.layers] == [
        get_adapter(case["model"]).layer_shape(lay) for lay in case["model"].model.layers
    ]
    assert checkpoint.model_layer_shapes(model) == expected_shapes(name, case["model"])


def test_resave_loaded_checkpoint(saved, tmp_path):
    case = saved[0]["qwen3"]
    model, tok = slimops.load(case["path"], dtype=torch.float32)
    again, _ = slimops.load(slimops.save_pruned(model, tmp_path / "again", tokenizer=tok))
    torch.testing.assert_close(logits(again), case["logits"], atol=1e-5, rtol=1e-5)


# ---- atomic writes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    model = make_tiny_model("llama", layers=2, perturb=True)
    return apply_plan(model, random_gqa_plan(model))


def _boom(*args, **kwargs):
    raise KeyboardInterrupt  # the worst case: not even an Exception


def test_failed_save_leaves_nothing(small, tmp_path, monkeypatch):
    plan = random_gqa_plan(make_tiny_model("llama", layers=2, perturb=True))
    monkeypatch.setattr(PruningPlan, "to_json", _boom)  # fails after the weights are written
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_pruned(small, tmp_path / "out", plan=plan)
    assert list(tmp_path.iterdir()) == []


def test_existing_folder(small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    checkpoint.save_pruned(small, out)  # an empty folder is fine
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save_pruned(small, out)
    (out / "marker").write_text("old")
    monkeypatch.setattr(checkpoint, "_remote_source", _boom)
    with pytest.raises(KeyboardInterrupt):  # failed overwrite keeps the old one
        checkpoint.save_pruned(small, out, overwrite=True)
    assert (out / "marker").read_text() == "old"
    monkeypatch.undo()
    checkpoint.save_pruned(small, out, overwrite=True)
    assert not (out / "marker").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_rename_restores_old_folder(small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    real_rename = os.rename

    def rename(src, dst):  # moving the old folder aside works, moving the new one in fails
        if Path(dst) == out and ".tmp-" in Path(src).name:
            raise OSError("disk went away")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(OSError, match="disk went away"):
        checkpoint.save_pruned(small, out, overwrite=True)
    assert (out / "marker").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_load_names_a_corrupt_config(tmp_path):
    import slimops

    (tmp_path / "config.json").write_text('{"model_type": "llama",')  # cut short
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: not valid JSON"):
        slimops.load(tmp_path)
