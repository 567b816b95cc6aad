"""SlimGPT's allocation (methods/allocation.py): error curves, the least-error split between
heads and FFN, the cross-layer allocation and its weights, and the paper's equal split in
query heads (no half-unit overshoot of the attention share)."""

import pytest
import torch

from helpers import make_tiny_model
from slimops.methods.allocation import (
    Curve,
    allocate,
    best_split,
    gradient_weights,
    layer_curve,
)
from slimops.models import get_adapter
from slimops.pipeline import prune_model


def calib(n=8, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_curve_interpolates_and_ends():
    c = Curve([0.0, 10.0, 30.0], [0.0, 1.0, 5.0])
    assert c.at(0) == 0 and c.at(5) == pytest.approx(0.5) and c.at(20) == pytest.approx(3.0)
    assert c.at(31) == float("inf") and c.max_params == 30


def test_best_split_takes_the_cheaper_side():
    heads = Curve([0.0, 10.0, 20.0], [0.0, 0.1, 0.2])  # heads are nearly free
    ffn = Curve([0.0, 20.0], [0.0, 10.0])
    assert best_split(heads, ffn, 20) == 20
    heads = Curve([0.0, 10.0, 20.0], [0.0, 50.0, 100.0])  # heads are expensive
    assert best_split(heads, ffn, 20) == 0
    assert best_split(heads, ffn, 5) == 0  # never above the target


def test_layer_curve_is_the_lower_envelope():
    heads = Curve([0.0, 10.0], [0.0, 1.0])
    ffn = Curve([0.0, 10.0], [0.0, 3.0])
    lc = layer_curve(heads, ffn, points=4)
    assert lc.params == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert lc.errors[2] == pytest.approx(1.0) and lc.errors[4] == pytest.approx(4.0)


def test_allocate_meets_total_and_cap_and_favours_cheap_layers():
    grid = [10.0 * i for i in range(11)]
    cheap = Curve(grid, [0.02 * p * p for p in grid])  # convex, 10x cheaper
    dear = Curve(grid, [0.2 * p * p for p in grid])
    ratios = allocate([cheap, dear], [100, 100], [1.0, 1.0], total=80, cap=0.9)
    assert sum(r * 100 for r in ratios) == pytest.approx(80)
    assert ratios[0] > ratios[1] and max(ratios) <= 0.9
    weighted = allocate([cheap, dear], [100, 100], [20.0, 1.0], total=80, cap=0.9)
    assert weighted[1] > weighted[0]  # a weight turns the preference around
    with pytest.raises(ValueError, match="per-layer cap"):
        allocate([cheap, dear], [100, 100], [1.0, 1.0], total=190, cap=0.9)


def test_gradient_weights_are_positive_and_leave_the_model_as_it_was():
    model = make_tiny_model("llama", layers=3)
    flags = [p.requires_grad for p in model.parameters()]
    w = gradient_weights(model, get_adapter(model), calib(4, 16), batch_size=2)
    assert len(w) == 3 and all(x > 0 for x in w)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_equal_split_is_the_ratio_of_query_heads():
    """The issue's case: 50% uniform with 8 query heads in 2 KV groups keeps half the heads
    of every group (the FFN takes the rest), not 6 of 8 (the half-unit overshoot of the
    attention-parameter share)."""
    model = make_tiny_model("llama", layers=2, num_attention_heads=8, num_key_value_heads=2)
    plan, report = prune_model(model, calib(), "slimgpt", 0.5, "uniform", split="equal")
    assert [len(lp.kept_heads) for lp in plan.layers] == [4, 4]
    assert [len(lp.kept_kv_heads) for lp in plan.layers] == [2, 2]
    assert abs(report.achieved_ratio - 0.5) <= 0.01


@pytest.mark.parametrize("schedule", ["log", "obs"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_obs_split_and_schedule_keep_the_contract(family, schedule):
    model = make_tiny_model(family, layers=3, perturb=True)
    plan, report = prune_model(model, calib(), "slimgpt", 0.4, schedule, split="obs")
    assert abs(report.achieved_ratio - 0.4) <= 0.01
    assert plan.info["split"] == "obs" and len(plan.info["layer_ratios"]) == 3
    if schedule == "obs":
        assert max(plan.info["layer_ratios"]) <= 0.9
    adapter = get_adapter(model)
    for layer, lp in zip(adapter.layers(), plan.layers):  # sliced: widths as planned
        assert adapter.layer_shape(layer)[0] == len(lp.kept_heads)
