"""`slimops bench` and benchmarks/make_shaped_model.py on tiny models: the CLI end to end
(dense + per-layer-shaped checkpoint -> table, JSON, PNG, speedup line), MACs/token against
a hand count and torch's FLOP counter, exactly `gen` tokens, one generate code path for
dense and pruned, one-line errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from helpers import ROOT, load_benchmark, make_tiny_model, make_tiny_tokenizer, random_gqa_plan
from slimops.checkpoint import save_pruned
from slimops.cli import main
from slimops.evaluation import throughput as tp
from slimops.slicing import apply_plan

SPEEDUP_LINE = re.compile(r"^speedup decode (\d+\.\d\d) prefill (\d+\.\d\d)$")
FAST = ["--gen", "4", "--prompt", "16", "--repeats", "2", "--warmup", "1"]
# conftest's tiny llama: hidden 64, head_dim 16, 4 query / 2 KV heads, FFN 160, 3 layers,
# vocab 256, untied lm_head.
HIDDEN, HEAD_DIM, VOCAB = 64, 16, 256


def pruned_tiny_model(**overrides):
    """(model sliced to per-layer shapes, plan): layer 0 drops a KV group, layer 1 one query
    head per group, random FFN widths everywhere."""
    model = make_tiny_model("llama", **overrides)
    plan = random_gqa_plan(model)
    return apply_plan(model, plan), plan


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    """(dense folder, pruned slimops checkpoint folder with per-layer shapes)."""
    root, tok = tmp_path_factory.mktemp("bench"), make_tiny_tokenizer()
    dense = root / "dense"
    make_tiny_model("llama").save_pretrained(dense)
    tok.save_pretrained(dense)
    model, plan = pruned_tiny_model()
    pruned = save_pruned(model, root / "pruned", tokenizer=tok, plan=plan)
    assert "slimops_layers" in json.loads((pruned / "config.json").read_text())
    return dense, pruned


def settings(**kw) -> tp.BenchSettings:
    return tp.BenchSettings(**{"prompts": [16], "gen": 4, "repeats": 1, "warmup": 0, **kw})


# ---- the CLI end to end -------------------------------------------------------------------
def test_cli_dense_vs_pruned_writes_table_json_plot(saved_pair, tmp_path, capsys):
    dense, pruned = saved_pair
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(
        [
            "bench",
            str(dense),
            str(pruned),
            *FAST,
            "--batch",
            "1",
            "2",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = SPEEDUP_LINE.match(lines[-1])
    assert match, lines[-1]
    assert sum(line.startswith("| dense |") for line in lines) == 2
    assert sum(line.startswith("| pruned |") for line in lines) == 2
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out_json.read_text())
    first, last = (m["results"][0] for m in report["models"])
    assert (first["batch"], first["prompt"]) == (1, 16)  # the speedup line's combo
    want = last["decode_tok_s"]["median"] / first["decode_tok_s"]["median"]
    assert match.group(1) == f"{want:.2f}" == f"{report['speedup']['decode']:.2f}"
    for entry in report["models"]:
        assert entry["cache"] == "static"  # per-layer KV heads included
        assert [(r["batch"], r["prompt"]) for r in entry["results"]] == [(1, 16), (2, 16)]
        for result in entry["results"]:
            assert len(result["repeats"]) == 2
            assert all(r["generated_tokens"] == 4 and r["decode_s"] > 0 for r in result["repeats"])
    assert report["models"][1]["params"] < report["models"][0]["params"]


def test_single_model_speedup_is_one(saved_pair, capsys):
    assert (
        main(
            [
                "bench",
                str(saved_pair[0]),
                "--gen",
                "3",
                "--prompt",
                "8",
                "--repeats",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == "speedup decode 1.00 prefill 1.00"


# ---- same code path, correct cache --------------------------------------------------------
def test_dense_and_pruned_run_the_same_generate_path(saved_pair, monkeypatch):
    """No per-layer Python fallback: both run HF's LlamaForCausalLM.forward / generate and
    LlamaAttention, the same number of times, for different per-layer head counts."""
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    original = modeling_llama.LlamaAttention.forward

    def counting_forward(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", counting_forward)
    entries, counts = [], []
    for path in saved_pair:
        calls["n"] = 0
        entries.append(tp.bench_model(str(path), settings()))
        counts.append(calls["n"])
    # per layer: 2 forwards in the static-cache probe, 1 timed prefill, gen in generate
    assert counts == [3 * (2 + 1 + 4)] * 2
    dense, pruned = entries
    assert dense["code_path"] == pruned["code_path"]
    assert dense["code_path"]["hf_class"] == "LlamaForCausalLM"
    assert dense["code_path"]["generate"] == "GenerationMixin.generate"
    assert dense["query_heads"] == [4, 4, 4] and pruned["query_heads"] == [2, 2, 4]


def test_static_cache_gives_dynamic_cache_tokens_for_per_layer_shapes():
    model, _ = pruned_tiny_model()
    ids = tp.random_prompt(VOCAB, 2, 16, seed=0, device="cpu")
    outs = {
        cache: model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=tp.generation_config(model, 6, cache),
        )
        for cache in ("static", "dynamic")
    }
    assert torch.equal(outs["static"], outs["dynamic"])


def test_static_cache_failure_falls_back_with_a_note(monkeypatch):
    model = make_tiny_model("llama")

    def refuse(*args, **kwargs):
        raise ValueError("no static cache for this family")

    monkeypatch.setattr(model, "_prepare_static_cache", refuse)
    cache, note = tp.choose_cache(model, tp.random_prompt(VOCAB, 1, 8, 0, "cpu"), True)
    assert cache == "dynamic" and "no static cache for this family" in note


# ---- exactly gen tokens -------------------------------------------------------------------
def test_decode_generates_exactly_gen_tokens_even_when_eos_comes_first():
    model = make_tiny_model("llama")
    ids = tp.random_prompt(VOCAB, 1, 16, seed=0, device="cpu")
    first = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)[0, -1].item()
    model.generation_config.eos_token_id = first  # greedy's first pick is now EOS
    plain = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert plain.shape[1] == 16 + 1  # without min_new_tokens: stops
    run = tp.time_generate(model, ids, tp.generation_config(model, 5, "static"))
    assert run["generated_tokens"] == 5 and run["steps_timed"] == 5
    assert run["ttft_s"] > 0 and run["decode_s"] > 0 and run["total_s"] >= run["decode_s"]


def test_bench_combo_counts_decode_tokens_after_the_first():
    model = make_tiny_model("llama")
    result = tp.bench_combo(model, 2, 16, settings(repeats=2), "static")
    assert [r["generated_tokens"] for r in result["repeats"]] == [4, 4]
    rates = sorted(2 * 3 / r["decode_s"] for r in result["repeats"])
    assert result["decode_tok_s"]["min"] == pytest.approx(rates[0])
    assert result["prefill_tok_s"]["max"] == pytest.approx(
        max(2 * 16 / r["prefill_s"] for r in result["repeats"])
    )


# ---- MACs per token -----------------------------------------------------------------------
def hand_count(shapes: list[tuple[int, int, int]], context: int) -> int:
    """Per layer q/o: hidden x heads*head_dim, k/v: hidden x kv*head_dim, gate/up/down:
    hidden x ffn; attention 2 * heads * head_dim * context; lm_head vocab x hidden."""
    total = VOCAB * HIDDEN
    for heads, kv, ffn in shapes:
        total += 2 * HIDDEN * heads * HEAD_DIM + 2 * HIDDEN * kv * HEAD_DIM + 3 * HIDDEN * ffn
        total += 2 * heads * HEAD_DIM * context
    return total


def test_macs_per_token_matches_a_hand_count():
    dense = make_tiny_model("llama")
    assert tp.macs_per_token(dense, 16) == hand_count([(4, 2, 160)] * 3, 16) == 151_552
    pruned, plan = pruned_tiny_model()
    shapes = [
        (len(lp.kept_heads), len(lp.kept_kv_heads), len(lp.kept_channels)) for lp in plan.layers
    ]
    assert tp.macs_per_token(pruned, 40) == hand_count(shapes, 40)
    assert tp.macs_per_token(pruned, 40) < tp.macs_per_token(dense, 40)


@pytest.mark.parametrize("pruned", [False, True])
def test_macs_per_token_matches_torch_flop_counter_on_a_decode_step(pruned):
    """One decode step attending to `context` positions: torch counts 2 flops per MAC of
    every mm/bmm (eager attention, so q.k and attn.v are visible bmm's)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = (pruned_tiny_model if pruned else make_tiny_model)(attn_implementation="eager")
    model = model[0] if pruned else model
    context = 24
    with torch.no_grad():
        cache = model(tp.random_prompt(VOCAB, 1, context - 1, 0, "cpu"), use_cache=True)
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.tensor([[7]]), past_key_values=cache.past_key_values, use_cache=True)
    assert counter.get_total_flops() == 2 * tp.macs_per_token(model, context)


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}"], "does not exist"),
        (["{dense}", "--gen", "1"], "--gen 1"),
        (["{dense}", "--batch", "0"], "--batch values must be positive"),
        (["{dense}", "--compile", "--no-static-cache"], "needs the static KV cache"),
        (["{dense}", "--device", "tpu"], "choose cpu, cuda or cuda:N"),
        (["{dense}", "{bert}"], "needs a causal LM"),
        pytest.param(
            ["{dense}", "--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA"),
        ),
    ],
)
def test_bad_input_is_one_clear_line(saved_pair, tmp_path, capsys, args, message):
    from transformers import BertConfig

    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path / "bert")  # config suffices
    names = {
        "missing": str(tmp_path / "nope"),
        "dense": str(saved_pair[0]),
        "bert": str(tmp_path / "bert"),
    }
    out = tmp_path / "b.json"
    assert main(["bench", *[a.format(**names) for a in args], "--json", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimops bench: error:") and message in err[0]
    assert captured.out == "" and not out.exists()


def test_fp16_on_cpu_is_allowed_with_a_note():
    assert any("fp16 on CPU" in n for n in tp.check_settings(settings(dtype="fp16")))


# ---- benchmarks/make_shaped_model.py ------------------------------------------------------
@pytest.fixture(scope="module")
def shaped():
    return load_benchmark("make_shaped_model")


def test_make_shaped_model_builds_a_loadable_model(shaped, tmp_path, capsys):
    from transformers import AutoTokenizer

    from slimops.pipeline import load_model

    out = tmp_path / "shaped"
    assert (
        shaped.main(
            [
                "--hidden",
                "64",
                "--ffn",
                "176",
                "--heads",
                "4",
                "--kv-heads",
                "2",
                "--layers",
                "2",
                "--dtype",
                "bf16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    model, tok = load_model(str(out), "bf16")
    cfg = model.config
    assert (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.num_hidden_layers,
        cfg.vocab_size,
    ) == (64, 176, 4, 2, 2, 4096)
    assert model.model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    reference = AutoTokenizer.from_pretrained(ROOT / "slimops" / "assets" / "reference_model")
    text = "def f(x):\n    return x ** 2  # café"
    assert tok(text)["input_ids"] == reference(text)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([tok(text)["input_ids"]])).logits
    assert torch.isfinite(logits).all()
    # ... and benches like any other folder
    entry = tp.bench_model(str(out), settings(dtype="bf16"))
    assert entry["results"][0]["repeats"][0]["generated_tokens"] == 4


def test_make_shaped_model_preset_and_bad_shapes(shaped, tmp_path, capsys):
    args = shaped.parse_args(["--preset", "llama-7b", "--layers", "2", "--out", "x"])
    assert (args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab, args.dtype) == (
        4096,
        11008,
        32,
        32,
        32000,
        "bf16",
    )
    assert args.layers == 2  # explicit beats the preset
    assert shaped.build_config(args).head_dim == 128
    assert shaped.main(["--hidden", "64", "--heads", "5", "--out", str(tmp_path / "o")]) == 2
    assert "not a multiple of --heads 5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
