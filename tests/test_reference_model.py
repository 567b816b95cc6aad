"""The shipped reference model: loads offline, its tokenizer round-trips with the exact ids
it was trained on, it is really trained, and the demo prunes it with a small ppl change."""

import json

import pytest
import torch

from slimops import corpus
from slimops.demo import REFERENCE_MODEL, run_demo

needs_corpus = pytest.mark.skipif(corpus.find_corpus_dir() is None, reason=corpus.CORPUS_HINT)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL).eval(),
        AutoTokenizer.from_pretrained(REFERENCE_MODEL),
    )


def test_tokenizer_ids_match_the_trained_tokenizer(reference):
    from tokenizers import Tokenizer

    _, tok = reference
    raw = Tokenizer.from_file(str(REFERENCE_MODEL / "tokenizer.json"))
    text = "Hello, World!\n\n  def f(x):\treturn x ** 2  # naïve café\n.. versionadded:: 3.11"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_reference_model_shape_and_size():
    cfg = json.loads((REFERENCE_MODEL / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert (REFERENCE_MODEL / "model.safetensors").stat().st_size <= 25 * 2**20


@needs_corpus
def test_reference_model_is_trained(reference):
    from slimops.calibration import tokenize
    from slimops.evaluation.perplexity import perplexity

    model, tok = reference
    ids = tokenize(corpus.read_split("test"), tok)
    ppl = perplexity(model, ids, seqlen=128, batch_size=32, max_windows=32, progress=False)
    assert ppl < 150, ppl  # an untrained model of this vocab scores ~4096


def test_demo_prunes_20_percent_with_small_ppl_change(tmp_path, capsys, monkeypatch):
    """The demo needs no corpus on the machine: it reads the excerpt shipped with slimops."""
    monkeypatch.setattr(corpus, "find_corpus_dir", lambda: None)  # as on a fresh machine
    result = run_demo(ratio=0.2, out=str(tmp_path / "pruned"), eval_windows=32)
    report = result["report"]
    assert abs(report.achieved_ratio - 0.2) <= 0.01
    assert result["pruned_ppl"] < 1.15 * result["dense_ppl"]
    printed = capsys.readouterr().out
    assert "| slimgpt 20% |" in printed
    assert "reference model: slimops/assets/reference_model\n" in printed  # same on every machine
    assert "python3-doc excerpt in slimops/assets/demo_text" in printed
    import slimops

    model, tok = slimops.load(tmp_path / "pruned")
    ids = torch.tensor([tok("The os module", add_special_tokens=False)["input_ids"]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


@needs_corpus
def test_shipped_demo_text_is_the_corpus_excerpt(reference):
    """The shipped text is what scripts/make_demo_text.py builds from the corpus' own split
    (train files only for calibration), and its test tokens are the corpus test split's first
    512 windows: the windows the demo scored when it read the corpus."""
    import runpy

    from helpers import ROOT
    from slimops import demo
    from slimops.calibration import tokenize

    build = runpy.run_path(str(ROOT / "scripts" / "make_demo_text.py"))
    _, tok = reference
    assert build["train_excerpt"]() == demo._shipped_text("train")
    assert build["test_excerpt"](tok) == demo._shipped_text("test")
    n = demo.EVAL_WINDOWS * demo.EVAL_SEQLEN
    shipped = tokenize(demo._shipped_text("test"), tok)[:n]
    assert torch.equal(shipped, tokenize(corpus.read_split("test"), tok)[:n])


def test_data_free_calibration_is_quiet():
    """The fallback a newcomer without python3-doc sees: no transformers warnings (attention
    mask, right padding) while sampling calibration text from the model."""
    import logging
    import warnings

    from slimops.calibration import sample_from_model
    from slimops.pipeline import load_model

    model, tokenizer = load_model(str(REFERENCE_MODEL))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ids = sample_from_model(model, tokenizer, 3, 8, seed=0, batch_size=2)
    finally:
        hf_logger.removeHandler(handler)
    assert ids.shape == (3, 8)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []
