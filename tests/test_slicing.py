"""Slicing computes exactly what masking computes, for every family; bad plans fail early."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from slimops.models import get_adapter
from slimops.plan import LayerPlan, PruningPlan
from slimops.slicing import apply_plan, mask_layer

# Tiny random models: hidden 64, head_dim 16, vocab 128. qwen2 has q/k/v biases, qwen3
# q_norm/k_norm; llama_mha has one query head per KV group, the rest two.
FAMILIES = {
    "llama_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2)),
}


def tiny_model(family: str, layers: int = 3, seed: int = 0, **overrides):
    import transformers
    config_name, heads = FAMILIES[family]
    kwargs = dict(hidden_size=64, head_dim=16, intermediate_size=96, num_hidden_layers=layers,
                  vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False, **heads)
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():     # HF's init leaves biases and norms trivial: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_gqa_plan(model, seed: int = 0) -> PruningPlan:
    """Valid GQA plan: layer 0 drops a whole KV group, layer 1 drops one query head from
    every group (MHA: one head), the rest keep all heads; random FFN channels everywhere."""
    rng = random.Random(seed)
    a = get_adapter(model)
    nh, nkv, ffn = a.num_heads, a.num_kv_heads, a.intermediate_size
    rep = nh // nkv
    layers = []
    for i in range(len(a.layers())):
        kv = list(range(nkv))
        if i == 0 or (i == 1 and rep == 1):
            kv.remove(rng.randrange(nkv))
            heads = [h for h in range(nh) if h // rep in kv]
        elif i == 1:
            heads = sorted(h for g in kv for h in rng.sample(range(g * rep, (g + 1) * rep), rep - 1))
        else:
            heads = list(range(nh))
        channels = sorted(rng.sample(range(ffn), rng.randrange(ffn // 4, ffn)))
        layers.append(LayerPlan(heads, kv, channels))
    return PruningPlan(layers)


def input_ids(seed: int = 0, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids=None) -> torch.Tensor:
    return model(input_ids() if ids is None else ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_equals_masked(family):
    model = tiny_model(family)
    plan = random_gqa_plan(model, seed=list(FAMILIES).index(family))
    masked, sliced = copy.deepcopy(model), copy.deepcopy(model)
    adapter = get_adapter(masked)
    for layer, lp in zip(adapter.layers(), plan.layers):
        mask_layer(adapter, layer, lp)
    apply_plan(sliced, plan)

    torch.testing.assert_close(logits(sliced), logits(masked), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(sliced), logits(model), atol=1e-3)  # it did prune
    got = [dict(zip(("num_attention_heads", "num_key_value_heads", "intermediate_size"),
                    get_adapter(sliced).layer_shape(layer))) for layer in sliced.model.layers]
    assert got == plan.shapes()


@torch.no_grad()
def test_sliced_model_generates_with_cache():
    """Per-layer KV head counts work with the KV cache: incremental == full forward."""
    model = tiny_model("qwen2")
    apply_plan(model, random_gqa_plan(model))
    ids = input_ids()
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    full = model(out[:, :-1]).logits[:, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(full, out[:, ids.shape[1]:])


@pytest.mark.parametrize("heads, kv, match", [
    ([0, 1, 2], [0, 1], "unequal query-head counts"),     # groups keep 2 and 1 heads
    ([0, 2], [0], "KV group 1 is not"),                    # head 2 lives in a dropped group
    ([1, 0], [0], "sorted"),
])
def test_plan_breaking_gqa_raises_before_any_change(heads, kv, match):
    model = tiny_model("llama_gqa")
    before = logits(model)
    plan = random_gqa_plan(model)
    plan.layers[-1] = LayerPlan(heads, kv, list(range(10)))   # bad LAST layer
    with pytest.raises(ValueError, match=match):
        apply_plan(model, plan)
    # all layers are checked before any is sliced: the model is untouched
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_plan_with_wrong_layer_count_raises():
    model = tiny_model("llama_mha", layers=2)
    with pytest.raises(ValueError, match="plan has 3 layers, model has 2"):
        apply_plan(model, PruningPlan.dense(3, 4, 4, 96))
