"""Sheared-LLaMA's pruning stage: hard-concrete gates against the paper's formulas, the
expected-size formula against brute-force counts, the gated model against the folded and
sliced one, exact GQA-valid target shapes and stock reloads on every LLaMA-like family."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, make_tiny_model
from slimops.checkpoint import save_pruned
from slimops.methods.sheared import hard_concrete as hc
from slimops.methods.sheared.masks import (
    Geometry,
    Shape,
    ShearedMasks,
    fold_gates,
    gated,
    plan_from_gates,
)
from slimops.methods.sheared.method import (
    ShearedConfig,
    parse_target,
    resolve_target,
    shape_for_ratio,
)
from slimops.models import get_adapter
from slimops.models.remote_modeling import SHAPE_KEYS
from slimops.pipeline import prune_model
from slimops.slicing import apply_plan

DECODERS = [f for f in FAMILIES if f in ("llama", "llama-mha", "mistral", "qwen2", "qwen3")]
TARGET = Shape(hidden=48, layers=2, heads=2, kv_heads=1, ffn=100)


def test_hard_concrete_matches_the_paper_formulas():
    gate = hc.HardConcrete((4000,), droprate_init=0.3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate.log_alpha.uniform_(-3, 3)
    g = torch.Generator().manual_seed(1)
    z = gate.sample(g)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(1)).clamp(hc.EPS, 1 - hc.EPS)
    ref = hc.sample_reference(gate.log_alpha.detach(), u)
    torch.testing.assert_close(z.double(), ref, atol=1e-6, rtol=1e-5)  # fp32 vs fp64
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()
    # P(z != 0) = sigmoid(log_alpha - beta ln(-l/r)), checked by sampling one gate 20k times
    one = hc.HardConcrete((20000,))
    with torch.no_grad():
        one.log_alpha.fill_(0.4)
    freq = (one.sample(torch.Generator().manual_seed(2)) > 0).double().mean()
    assert abs(freq - one.keep_prob()[0].double()) < 0.01
    start = math.log(0.7 / 0.3)
    fresh = hc.HardConcrete((1000,), droprate_init=0.3, generator=torch.Generator().manual_seed(0))
    assert abs(fresh.log_alpha.mean().item() - start) < 0.01


def test_hard_concrete_rejects_bad_droprate():
    with pytest.raises(ValueError, match="droprate_init"):
        hc.HardConcrete((3,), droprate_init=1.0)


def random_masks(model, seed=0):
    masks = ShearedMasks(Geometry.of(get_adapter(model)), seed=seed)
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.normal_(0, 2, generator=torch.Generator().manual_seed(seed))
    return masks


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("tied", [False, True])
def test_gated_model_equals_folded_and_sliced_model(family, tied):
    model = make_tiny_model(family, layers=3, perturb=True, tie_word_embeddings=tied)
    adapter = get_adapter(model)
    masks = random_masks(model)
    target = TARGET if family != "llama-mha" else Shape(48, 2, 2, 2, 100)
    z = masks.final_gates(target)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), gated(adapter, z):
        want = model(ids).logits
    fold_gates(adapter, z)
    apply_plan(model, plan_from_gates(z))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    sliced = get_adapter(model)
    assert model.config.hidden_size == target.hidden == sliced.hidden_size
    assert len(sliced.layers()) == target.layers
    for layer in sliced.layers():  # exact target shape, GQA valid
        assert sliced.layer_shape(layer) == (target.heads, target.kv_heads, target.ffn)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("family", DECODERS)
def test_expected_size_equals_brute_force_counts(family):
    """0/1 masks: the formula is the sliced model's parameter count; probabilities: the
    formula is the mean of the counts of sampled 0/1 masks (the gates are independent)."""
    model = make_tiny_model(family, layers=3, perturb=True)
    masks = random_masks(model, seed=3)
    geo = masks.geometry
    assert geo.size(geo.shape) == get_adapter(model).decoder_params()
    target = TARGET if family != "llama-mha" else Shape(40, 2, 3, 3, 77)
    z = masks.final_gates(target)
    binary = {k: (v != 0).float() for k, v in z.items()}
    fold_gates(get_adapter(model), z)
    apply_plan(model, plan_from_gates(z))
    assert int(masks.expected_size(binary)) == get_adapter(model).decoder_params()
    assert geo.size(target) == get_adapter(model).decoder_params()
    p = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(5)) for k, v in z.items()}
    g = torch.Generator().manual_seed(6)
    counts = [
        float(
            masks.expected_size(
                {k: (torch.rand(v.shape, generator=g) < v).float() for k, v in p.items()}
            )
        )
        for _ in range(4000)
    ]
    mean = sum(counts) / len(counts)
    assert abs(mean - float(masks.expected_size(p))) < 0.02 * mean


def test_query_heads_count_with_their_kv_group():
    model = make_tiny_model("llama", layers=1)
    masks = ShearedMasks(Geometry.of(get_adapter(model)))
    ones = {k: torch.ones(g.log_alpha.shape) for k, g in masks.gates.items()}
    full = masks.expected_size(ones)
    ones["kv"][0, 1] = 0  # KV group 1 gone: its k/v head AND its 2 query heads
    geo = masks.geometry
    per_q = (2 * 64 + geo.q_bias) * 16
    per_kv = (2 * 64 + geo.kv_bias) * 16
    assert int(full - masks.expected_size(ones)) == 2 * per_q + per_kv


def test_targets_parse_and_refuse_bad_shapes(tmp_path):
    geo = Geometry.of(get_adapter(make_tiny_model("llama", layers=3)))
    src = geo.shape
    assert parse_target("hidden=48,heads=2,kv_heads=1", src) == Shape(48, 3, 2, 1, 160)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}))
    assert parse_target(str(cfg), src) == Shape(32, 2, 4, 2, 64)
    for bad, match in (
        ("hidden=65", "hidden=65 must be in"),
        ("heads=3", "not a multiple"),
        ("heads=4,kv_heads=1", "per KV group"),
        ("width=3", "KEY one of"),
        ("hidden=x", "KEY=INT"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_target(bad, src)
    with pytest.raises(FileNotFoundError):
        parse_target(str(tmp_path / "none.json"), src)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_shape_rule_hits_the_ratio(ratio):
    geo = Geometry.of(get_adapter(make_tiny_model("llama", layers=3)))
    shape = shape_for_ratio(ratio, geo)
    shape.check_within(geo.shape)
    assert shape.layers == geo.shape.layers and shape.kv_heads == geo.shape.kv_heads
    assert shape.hidden % shape.heads == 0
    assert abs(1 - geo.size(shape) / geo.size(geo.shape) - ratio) < 0.05
    assert resolve_target(ShearedConfig(ratio=ratio), geo) == shape


def test_lagrangian_multipliers_ascend():
    """One step with the model too big: lambda_1 rises (gradient ascent), the log_alphas fall."""
    model = make_tiny_model("llama", layers=2)
    masks = ShearedMasks(Geometry.of(get_adapter(model)))
    target = Shape(32, 2, 2, 1, 80)
    opt = torch.optim.AdamW(
        [
            {"params": masks.mask_parameters(), "lr": 0.1},
            {"params": list(masks.lambdas.parameters()), "lr": 0.1, "maximize": True},
        ],
        weight_decay=0.0,
    )
    masks.lagrangian(masks.kept_fractions(masks.keep_probs()), target, ramp=1.0).backward()
    before = masks.gates["hidden"].log_alpha.detach().clone()
    opt.step()  # lambdas were 0: only they move on this first step
    for name in ("hidden", "head", "kv", "ffn"):
        assert masks.lambdas[name][0] > 0, name
    opt.zero_grad()
    masks.lagrangian(masks.kept_fractions(masks.keep_probs()), target, ramp=1.0).backward()
    opt.step()
    assert (masks.gates["hidden"].log_alpha < before).all()


@pytest.mark.parametrize("family", DECODERS)
def test_prune_model_sheared_gives_the_target_and_reloads_stock(family, tmp_path):
    model = make_tiny_model(family, layers=3, perturb=True)
    tokens = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    target = (
        "hidden=48,layers=2,heads=2,kv_heads=1,ffn=96"
        if family != "llama-mha"
        else ("hidden=48,layers=2,heads=2,kv_heads=2,ffn=96")
    )
    plan, report = prune_model(
        model, tokens, "sheared", 0.5, target=target, prune_steps=6, batch_size=4
    )
    assert report.decoder_params_after == plan.info["target_params"]
    kv = 1 if family != "llama-mha" else 2
    shapes = [tuple(s[k] for k in SHAPE_KEYS) for s in report.layer_shapes]
    assert shapes == [(2, kv, 96)] * 2
    assert model.config.hidden_size == 48
    out = save_pruned(model, tmp_path / "ck", plan=plan)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["hidden_size"] == 48  # a stock checkpoint
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_a_target_the_family_config_refuses_fails_before_training():
    model = make_tiny_model("llama", layers=2)
    geo = Geometry.of(get_adapter(model))
    cfg = ShearedConfig(target="hidden=50,heads=4")  # LlamaConfig: 50 % 4 != 0
    with pytest.raises(ValueError, match="LlamaConfig refuses"):
        resolve_target(cfg, geo, model.config)
    qwen = make_tiny_model("qwen2", layers=2)  # Qwen2Config accepts it
    assert resolve_target(cfg, Geometry.of(get_adapter(qwen)), qwen.config).hidden == 50


def test_saliency_init_orders_gates_by_saliency():
    from slimops.methods.saliency import dense_pass
    from slimops.methods.sheared.method import saliency_init

    model = make_tiny_model("llama", layers=2, perturb=True)
    adapter = get_adapter(model)
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    masks = ShearedMasks(Geometry.of(adapter), droprate_init=0.01)
    start = masks.gates["hidden"].log_alpha.detach().clone()
    saliency_init(masks, model, adapter, tokens, ShearedConfig(init="saliency"))
    stats, _ = dense_pass(model, adapter, tokens, 0.01, 16)
    for i, st in enumerate(stats):
        for family, scores in (("head", st.space.head_scores), ("ffn", st.space.channel_scores)):
            la = masks.gates[family].log_alpha[i].detach()
            assert la.argsort().tolist() == torch.tensor(scores).argsort().tolist(), family
            assert la.max() - la.min() == pytest.approx(2.0, abs=0.05)
    assert torch.equal(masks.gates["hidden"].log_alpha.detach(), start)  # hidden: droprate
    with pytest.raises(ValueError, match="init must be"):
        ShearedConfig(init="magic")


def test_a_hidden_slicing_plan_must_be_uniform_and_is_refused_before_any_change():
    model = make_tiny_model("llama", layers=2)
    masks = random_masks(model)
    plan = plan_from_gates(masks.final_gates(Shape(48, 2, 2, 1, 100)))
    plan.layers[1].kept_channels = plan.layers[1].kept_channels[:-1]  # layer 1: FFN 99
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="every layer one shape"):
        apply_plan(model, plan)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_corrupt_target_json_and_bad_saliency_options_fail_in_one_line(tmp_path):
    from slimops.methods.sheared.method import ShearedConfig, parse_target

    bad = tmp_path / "target.json"
    bad.write_text('{"hidden_size": 48,')  # truncated
    with pytest.raises(ValueError, match="target.json: not valid JSON"):
        parse_target(str(bad), Shape(64, 2, 4, 2, 128))
    for options in ({"saliency_windows": 0}, {"percdamp": -0.1}):
        with pytest.raises(ValueError, match="saliency_windows must be >= 1"):
            ShearedConfig(ratio=0.5, **options)
