"""Slicing computes exactly what masking computes, for every family; bad plans fail early."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import input_ids, logits, make_tiny_model, random_gqa_plan
from slimops.models import get_adapter
from slimops.plan import LayerPlan, PruningPlan
from slimops.slicing import apply_plan, mask_layer

# Families under test (helpers.FAMILIES); llama-mha has one query head per KV group.
# Models get perturbed biases and norms (HF inits them trivially): slicing must carry them.
FAMILIES = ["llama-mha", "llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_equals_masked(family):
    model = make_tiny_model(family, perturb=True)
    plan = random_gqa_plan(model, seed=list(FAMILIES).index(family))
    masked, sliced = copy.deepcopy(model), copy.deepcopy(model)
    adapter = get_adapter(masked)
    for layer, lp in zip(adapter.layers(), plan.layers):
        mask_layer(adapter, layer, lp)
    apply_plan(sliced, plan)

    torch.testing.assert_close(logits(sliced), logits(masked), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(sliced), logits(model), atol=1e-3)  # it did prune
    got = [
        dict(
            zip(
                ("num_attention_heads", "num_key_value_heads", "intermediate_size"),
                get_adapter(sliced).layer_shape(layer),
            )
        )
        for layer in sliced.model.layers
    ]
    assert got == plan.shapes()


@torch.no_grad()
def test_sliced_model_generates_with_cache():
    """Per-layer KV head counts work with the KV cache: incremental == full forward."""
    model = make_tiny_model("qwen2", perturb=True)
    apply_plan(model, random_gqa_plan(model))
    ids = input_ids()
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    full = model(out[:, :-1]).logits[:, ids.shape[1] - 1 :].argmax(-1)
    assert torch.equal(full, out[:, ids.shape[1] :])


@pytest.mark.parametrize(
    "heads, kv, match",
    [
        ([0, 1, 2], [0, 1], "unequal query-head counts"),  # groups keep 2 and 1 heads
        ([0, 2], [0], "KV group 1 is not"),  # head 2 lives in a dropped group
        ([1, 0], [0], "sorted"),
    ],
)
def test_plan_breaking_gqa_raises_before_any_change(heads, kv, match):
    model = make_tiny_model("llama", perturb=True)
    before = logits(model)
    plan = random_gqa_plan(model)
    plan.layers[-1] = LayerPlan(heads, kv, list(range(10)))  # bad LAST layer
    with pytest.raises(ValueError, match=match):
        apply_plan(model, plan)
    # all layers are checked before any is sliced: the model is untouched
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_plan_with_wrong_layer_count_raises():
    model = make_tiny_model("llama-mha", layers=2, perturb=True)
    with pytest.raises(ValueError, match="plan has 3 layers, model has 2"):
        apply_plan(model, PruningPlan.dense(3, 4, 4, 160))
