"""Virtual pruning (slimops/virtual.py): a layer run through slice_gemm views of its dense
weights computes what the materialised, sliced layer computes, and is restored after."""

import copy
from contextlib import ExitStack

import pytest
import torch

from helpers import FAMILIES, input_ids, make_tiny_bert, make_tiny_model, random_gqa_plan
from slimops.models import get_adapter
from slimops.slicing import apply_plan
from slimops.virtual import virtual_layer


def make(family):
    return make_tiny_bert() if family == "bert" else make_tiny_model(family, perturb=True)


@torch.no_grad()
def output(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", sorted(FAMILIES) + ["bert"])
def test_virtual_equals_materialised(family):
    model = make(family)
    plan = random_gqa_plan(model, seed=3)
    ids = input_ids()
    before = output(model, ids)
    adapter = get_adapter(model)
    with ExitStack() as stack:
        for layer, lp in zip(adapter.layers(), plan.layers):
            stack.enter_context(virtual_layer(adapter, layer, lp))
        got = output(model, ids)
    sliced = apply_plan(copy.deepcopy(model), plan)
    torch.testing.assert_close(got, output(sliced, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output(model, ids), before, atol=0, rtol=0)  # restored


@torch.no_grad()
def test_replaced_kept_columns_are_used():
    """A compact replacement weight for o/down (compensated kept columns) is what runs."""
    model = make("qwen2")
    adapter = get_adapter(model)
    layer, lp = adapter.layers()[2], random_gqa_plan(model, seed=1).layers[2]
    down = adapter.down_proj(layer)
    W = down.weight[:, lp.kept_channels] * 2
    h = torch.randn(5, len(lp.kept_channels))
    with virtual_layer(adapter, layer, lp, replace={"down": W}):
        got = adapter.down_proj(layer)(h)
    want = h @ W.T + (down.bias if down.bias is not None else 0)
    torch.testing.assert_close(got, want)
    assert adapter.down_proj(layer) is down
