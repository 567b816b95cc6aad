"""Baselines (magnitude, wanda-sp, flap, taylor): ratio contract, GQA validity, scores vs
float64 hand computations of the papers' formulas, FLAP's adaptive widths and bias
compensation, sliced == masked, pipeline dispatch and checkpoint round trip."""

import copy

import pytest
import torch

import slimops
from helpers import make_tiny_model
from slimops.methods import METHODS, common, make_config
from slimops.methods.baselines import flap, taylor, wanda_sp
from slimops.methods.baselines.flap import FlapConfig
from slimops.methods.common import UnitScores
from slimops.models import get_adapter
from slimops.pipeline import prune_model
from slimops.sequential import run_sequential
from slimops.slicing import apply_plan, mask_layer

BASELINES = ("magnitude", "wanda-sp", "flap", "taylor")


def calib(n=8, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("method", BASELINES)
def test_ratio_contract_and_gqa(method, ratio, family):
    model = make_tiny_model(family)
    plan, report = prune_model(model, calib(), method, ratio)  # apply_plan validates GQA
    assert abs(report.achieved_ratio - ratio) <= 0.01, report.summary()
    assert plan.method == method and plan.target_ratio == ratio
    adapter = get_adapter(model)
    for layer, shape in zip(adapter.layers(), plan.shapes()):
        nh, nkv, ffn = adapter.layer_shape(layer)
        assert (nh, nkv, ffn) == tuple(shape.values()) and nh % nkv == 0 and ffn >= 1
    assert torch.isfinite(model(calib(2)).logits).all()


def test_schedule_default_and_explicit():
    plan, _ = prune_model(make_tiny_model(), calib(), "magnitude", 0.3)
    assert plan.info["schedule"] == "uniform" and plan.info["layer_ratios"] == [0.3] * 3
    plan, report = prune_model(make_tiny_model(), calib(), "taylor", 0.3, [0.1, 0.3, 0.5])
    assert abs(report.achieved_ratio - 0.3) <= 0.01
    assert [round(r, 1) for r in plan.info["achieved_layer_ratios"]] == [0.1, 0.3, 0.5]
    plan, _ = prune_model(make_tiny_model(), calib(), "slimgpt", 0.3)
    assert plan.info["schedule"] == "log"


def test_bad_method_and_align_are_clear_errors():
    with pytest.raises(ValueError, match="magnitude, wanda-sp, flap, taylor"):
        prune_model(make_tiny_model(), calib(), "wanda", 0.2)
    assert set(BASELINES) < set(METHODS)
    with pytest.raises(ValueError, match="--align is implemented for slimgpt and search only"):
        prune_model(make_tiny_model(), calib(), "flap", 0.2, align=64)
    prune_model(make_tiny_model(), calib(), "flap", 0.2, align=1)  # 1 is "off"
    prune_model(
        make_tiny_model(), calib(), "magnitude", 0.2, batch_size=4, percdamp=0.01, align=None
    )


# ---- the shared GQA selector -------------------------------------------------------------

COSTS = {"head": 2, "kv_head": 2, "channel": 1}


def scores(heads, kv=(0.0, 0.0), channels=(1.0, 2.0, 3.0)):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return UnitScores(t(heads), t(kv), t(channels))


def test_selector_removes_a_useless_group_whole():
    kept, kv, removed = common.select_heads(scores([1.0, 1.0, 0.0, 0.0]), COSTS, 6)
    assert (kept, kv, removed) == ([0, 1], [0], 6)


def test_selector_removes_one_head_per_group_when_cheaper():
    kept, kv, removed = common.select_heads(scores([5.0, 0.1, 0.1, 5.0]), COSTS, 4)
    assert (kept, kv, removed) == ([0, 3], [0, 1], 4)


def test_selector_never_empties_a_layer():
    lp, _ = common.plan_layer(scores([1.0, 2.0, 3.0, 4.0]), COSTS, 1e9, 1e9)
    assert (lp.kept_heads, lp.kept_kv_heads, lp.kept_channels) == ([3], [1], [2])


# ---- scores vs float64 hand computations (one layer) -------------------------------------


def one_layer_fp64(family="qwen2"):
    return make_tiny_model(family, layers=1).double()


def dense_inputs(model, tokens):
    """(o_proj input, down_proj input) of layer 0 over all tokens, [T, features]."""
    layer, seen = model.model.layers[0], {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, k=k: seen.setdefault(k, []).append(a[0]))
        for k, m in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj))
    ]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return [torch.cat(seen[k]).reshape(-1, seen[k][0].shape[-1]) for k in ("o", "down")]


def method_column_scores(model, tokens, columns):
    adapter, out = get_adapter(model), []

    def collect(work):
        o, down = adapter.o_proj(work.layer), adapter.down_proj(work.layer)
        st = common.input_stats(work, {"o": o, "down": down})
        out.append(
            common.column_scores(
                adapter, work.layer, columns(o.weight, st["o"]), columns(down.weight, st["down"])
            )
        )

    run_sequential(model, adapter, tokens, collect, batch_size=3)
    return out[0]


@pytest.mark.parametrize("metric", ["wanda-sp", "flap"])
def test_column_scores_match_paper_formula(metric):
    model, tokens = one_layer_fp64(), calib()
    layer = model.model.layers[0]
    Xo, Xd = dense_inputs(model, tokens)
    Wo, Wd = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
    if metric == "wanda-sp":  # S_j = sum_i |W_ij| ||X_j||_2
        ref = [W.abs().sum(0) * X.norm(dim=0) for W, X in ((Wo, Xo), (Wd, Xd))]
        got = method_column_scores(model, tokens, wanda_sp.wanda_columns)
    else:  # FLAP eq. 5: S_j = Var(X_j) ||W_:,j||^2
        ref = [X.var(0) * W.pow(2).sum(0) for W, X in ((Wo, Xo), (Wd, Xd))]
        got = method_column_scores(model, tokens, flap.fluctuation_columns)
    torch.testing.assert_close(got.heads, ref[0].detach().view(4, 16).sum(1))
    torch.testing.assert_close(got.channels, ref[1].detach())
    assert (got.kv == 0).all()


def test_taylor_scores_match_first_order_formula():
    model, tokens = one_layer_fp64("llama"), calib()
    layer = model.model.layers[0]
    a, m = layer.self_attn, layer.mlp
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    W = [getattr(a, n).weight for n in names] + [
        m.gate_proj.weight,
        m.up_proj.weight,
        m.down_proj.weight,
    ]
    loss = model(tokens, labels=tokens).loss  # one batch: LLM-Pruner's loss
    imp = [(w * g).abs().detach() for w, g in zip(W, torch.autograd.grad(loss, W))]  # eq. 4
    q, k, v, o, gate, up, down = imp
    got = taylor.taylor_scores(model, tokens, get_adapter(model), batch_size=3)[0]
    torch.testing.assert_close(got.heads, q.view(4, -1).sum(1) + o.view(-1, 4, 16).sum((0, 2)))
    torch.testing.assert_close(got.kv, k.view(2, -1).sum(1) + v.view(2, -1).sum(1))
    torch.testing.assert_close(got.channels, gate.sum(1) + up.sum(1) + down.sum(0))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_magnitude_scores_are_owned_weight_norms():
    model = make_tiny_model("llama", layers=1)
    layer, adapter = model.model.layers[0], get_adapter(model)
    a = layer.self_attn
    got = common.owned_scores(adapter, layer, lambda lin: lin.weight.detach() ** 2)
    want = torch.stack(
        [
            a.q_proj.weight[h * 16 : (h + 1) * 16].norm() ** 2
            + a.o_proj.weight[:, h * 16 : (h + 1) * 16].norm() ** 2
            for h in range(4)
        ]
    )
    torch.testing.assert_close(got.heads, want.double().detach())


# ---- FLAP ------------------------------------------------------------------------------


def offset_model(layers=2):
    """qwen2 whose o_proj / down_proj inputs have a clear mean (v bias, up ~ gate), which
    FLAP's compensation can recover; random init leaves both means near zero."""
    model = make_tiny_model("qwen2", layers=layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.bias.fill_(0.5)
            layer.mlp.up_proj.weight.copy_(layer.mlp.gate_proj.weight)
    return model


def layer0_output(model, tokens):
    out = []
    h = model.model.layers[0].register_forward_hook(lambda m, a, o: out.append(o))
    with torch.no_grad():
        logits = model(tokens).logits
    h.remove()
    return (out[0][0] if isinstance(out[0], tuple) else out[0]), logits


def test_flap_bias_compensation_brings_outputs_closer_to_dense():
    tokens = calib()
    dense = offset_model()
    ref_layer, ref_logits = layer0_output(dense, tokens)
    errors = {}
    for bias in (True, False):
        model = copy.deepcopy(dense)
        flap.prune(model, tokens, FlapConfig(ratio=0.3, bias_compensation=bias))
        out, logits = layer0_output(model, tokens)
        errors[bias] = ((out - ref_layer).pow(2).mean(), (logits - ref_logits).pow(2).mean())
        assert (model.model.layers[0].mlp.down_proj.bias is not None) == bias
    assert errors[True][0] < 0.7 * errors[False][0], errors
    assert errors[True][1] < errors[False][1], errors


def test_flap_widths_adapt_to_the_layers():
    model = make_tiny_model("llama", layers=3)
    with torch.no_grad():  # layer 1: a few dominant FFN channels, the rest alike
        model.model.layers[1].mlp.down_proj.weight[:, :8] *= 20
    plan = flap.prune(model, calib(), FlapConfig(ratio=0.3))
    widths = [lp.shape()["intermediate_size"] for lp in plan.layers]
    assert widths[1] != widths[0] and widths[1] != widths[2], widths
    assert plan.info["threshold"] == plan.info["threshold"]  # recorded, finite
    assert len(set(map(str, plan.shapes()))) > 1


def test_flap_global_threshold_counts_hand_example():
    s = [
        scores([-0.78, -0.78, 0.26, 1.31], channels=[-1.16, -0.39, 0.39, 1.16]),
        scores([0.0, 0.0, 0.0, 0.0], channels=[-0.5, -0.5, -0.5, 1.5]),
    ]
    # z-scores as given. Costs: head 2 + 2/2, channel 1.
    # Ascending: L0 ch (1), L0 h, L0 h (3 each), L1 ch x3 (1 each): cumsum 1 4 7 8 9 10
    threshold, counts = flap.global_threshold(s, [COSTS, COSTS], [2, 2], target=10)
    assert counts == [(2, 1), (0, 3)] and threshold == pytest.approx(-0.5)
    _, counts = flap.global_threshold(s, [COSTS, COSTS], [2, 2], target=6.6)
    assert counts == [(2, 1), (0, 0)]


def test_flap_standardises_columns_then_averages_heads():
    """The authors' eq. 6: z-score every o_proj input column within the layer, then a head's
    score is the mean of its columns' z-scores (not a z-score of per-head sums)."""
    model = make_tiny_model("llama", layers=1)
    layer, adapter = model.model.layers[0], get_adapter(model)
    torch.manual_seed(1)
    o_cols, down_cols = torch.rand(64, dtype=torch.float64), torch.rand(160, dtype=torch.float64)
    got = flap.standardized_units(adapter, layer, o_cols, down_cols)
    z = (o_cols - o_cols.mean()) / o_cols.std()
    torch.testing.assert_close(
        got.heads, torch.stack([z[h * 16 : (h + 1) * 16].mean() for h in range(4)])
    )
    torch.testing.assert_close(got.channels, (down_cols - down_cols.mean()) / down_cols.std())


# ---- slicing and checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("method", BASELINES)
def test_sliced_equals_masked(method):
    model, tokens = make_tiny_model("qwen2"), calib()
    plan = METHODS[method].prune(model, tokens, make_config(method, 0.35))
    before = model(tokens[:2]).logits
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer, lp in zip(adapter.layers(), plan.layers):
            mask_layer(adapter, layer, lp)
    masked = model(tokens[:2]).logits
    if method in ("wanda-sp", "flap"):  # these already zeroed what they removed
        torch.testing.assert_close(masked, before)
    apply_plan(model, plan)
    torch.testing.assert_close(model(tokens[:2]).logits, masked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "flap"])
def test_checkpoint_round_trip(method, tmp_path):
    """save_pruned -> slimops.load gives the same logits; for flap the created o_proj /
    down_proj biases (checked non-trivial) must survive the trip."""
    model = offset_model(3) if method == "flap" else make_tiny_model("llama")
    tokens = calib()
    # at 0.5 flap removes heads too (its tiny-model head z-scores sit near 0 at 0.3)
    plan, _ = prune_model(model, tokens, method, 0.5 if method == "flap" else 0.3)
    want = model(tokens[:2]).logits
    loaded, _ = slimops.load(slimops.save_pruned(model, tmp_path / method, plan=plan))
    if method == "flap":  # biases exist where heads / channels went, and survive the trip
        pairs = [
            (m.bias, n.bias)
            for a, b in zip(model.model.layers, loaded.model.layers)
            for m, n in (
                (a.self_attn.o_proj, b.self_attn.o_proj),
                (a.mlp.down_proj, b.mlp.down_proj),
            )
        ]
        assert any(m is not None and m.abs().max() > 1e-2 for m, _ in pairs)
        for m, n in pairs:
            assert (m is None) == (n is None)
            if m is not None:
                torch.testing.assert_close(n, m)
    torch.testing.assert_close(loaded(tokens[:2]).logits, want, atol=1e-5, rtol=1e-5)
