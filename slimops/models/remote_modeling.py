"""Per-layer-shaped decoders for pruned checkpoints, loadable WITHOUT slimops installed.

This file is copied verbatim into every per-layer checkpoint as `modeling_slimops.py`, so
it imports only torch, transformers and the standard library (never slimops). The
checkpoint writer appends two lines naming the family, e.g.

    from transformers import LlamaConfig, LlamaForCausalLM
    SlimopsConfig, SlimopsForCausalLM = make_classes(LlamaConfig, LlamaForCausalLM)

and config.json's `auto_map` points AutoConfig / AutoModelForCausalLM at those names.

config.json keeps the family's original dense values (num_attention_heads, ...), so the
stock config validators pass (transformers 5.23's LlamaConfig refuses hidden_size %
num_attention_heads != 0 even with an explicit head_dim), plus `slimops_layers`: one
{"num_attention_heads", "num_key_value_heads", "intermediate_size"} dict per layer.
The model class builds the stock family model and swaps each layer's projections for
the pruned shapes before any weight is loaded or initialised.

transformers' own `per_layer_config` is not used: in 5.23 it makes these three keys
raise AmbiguousGlobalPerLayerAttributeError on the global config, LlamaConfig's validator
then fails on construction, and the stock Llama/Mistral/Qwen modeling reads the global
values in __init__, so it cannot express per-layer head counts for these families.
"""
from __future__ import annotations

import functools

from torch import nn

try:
    from transformers import TokenizersBackend
except ImportError:     # transformers 4: the same role under its old name
    from transformers import PreTrainedTokenizerFast as TokenizersBackend

SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
ATTN, MLP = "self_attn", "mlp"
# (parent module, projection, side whose width changes, shape key giving the width)
PROJECTIONS = (
    (ATTN, "q_proj", "out", "num_attention_heads"),
    (ATTN, "k_proj", "out", "num_key_value_heads"),
    (ATTN, "v_proj", "out", "num_key_value_heads"),
    (ATTN, "o_proj", "in", "num_attention_heads"),
    (MLP, "gate_proj", "out", "intermediate_size"),
    (MLP, "up_proj", "out", "intermediate_size"),
    (MLP, "down_proj", "in", "intermediate_size"),
)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_shapes(config) -> list[dict] | None:
    """The per-layer shapes recorded in the config, checked; None for a dense config."""
    shapes = getattr(config, "slimops_layers", None)
    if shapes is None:
        return None
    if len(shapes) != config.num_hidden_layers:
        raise ValueError(f"slimops_layers lists {len(shapes)} layers but num_hidden_layers is "
                         f"{config.num_hidden_layers}: the config.json is inconsistent")
    for i, shape in enumerate(shapes):
        missing = [k for k in SHAPE_KEYS if not shape.get(k)]
        if missing:
            raise ValueError(f"slimops_layers[{i}] lacks positive {missing}")
        if shape["num_attention_heads"] % shape["num_key_value_heads"]:
            raise ValueError(f"slimops_layers[{i}]: {shape['num_attention_heads']} query heads "
                             f"is not a multiple of {shape['num_key_value_heads']} KV heads")
    return shapes


def _resized(linear: nn.Linear, side: str, width: int) -> nn.Linear:
    """An uninitialised nn.Linear like `linear` with its in or out side set to `width`."""
    in_f, out_f = (width, linear.out_features) if side == "in" else (linear.in_features, width)
    if (in_f, out_f) == (linear.in_features, linear.out_features):
        return linear
    # Same device/dtype as the stock module: meta inside from_pretrained, the load dtype.
    return nn.Linear(in_f, out_f, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)


def reshape_layer(layer: nn.Module, shape: dict, head_dim: int) -> None:
    """Give one decoder layer the projection shapes of `shape` (weights left to the loader)."""
    for parent_name, name, side, key in PROJECTIONS:
        parent = getattr(layer, parent_name)
        width = shape[key] * (head_dim if parent_name == ATTN else 1)
        setattr(parent, name, _resized(getattr(parent, name), side, width))
    attn = getattr(layer, ATTN)
    nh, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    # HF attention reads repeat_kv's factor from this attribute, not from the weights.
    attn.num_key_value_groups = nh // nkv
    for attr, val in (("num_heads", nh), ("num_key_value_heads", nkv)):
        if hasattr(attn, attr):
            setattr(attn, attr, val)


def reshape_layers(model: nn.Module, config) -> nn.Module:
    """Reshape every decoder layer of a stock family model to config.slimops_layers."""
    shapes = layer_shapes(config)
    if shapes is None:
        return model
    layers = model.model.layers
    if len(layers) != len(shapes):
        raise ValueError(f"model has {len(layers)} layers, slimops_layers lists {len(shapes)}")
    hd = head_dim_of(config)
    for layer, shape in zip(layers, shapes):
        reshape_layer(layer, shape, hd)
    return model


@functools.cache
def make_classes(config_base: type, model_base: type) -> tuple[type, type]:
    """(config class, causal-LM class) for one family, e.g. (LlamaConfig, LlamaForCausalLM).

    The config keeps the family's model_type, so AutoTokenizer and tools that dispatch on
    model_type treat the checkpoint as that family; its own class (not the stock one)
    keeps AutoModelForCausalLM.register from remapping the stock config class.
    """
    class SlimopsConfig(config_base):
        pass

    class SlimopsForCausalLM(model_base):
        config_class = SlimopsConfig

        def post_init(self):
            # The stock __init__ calls post_init last: reshape first, so the new modules
            # get the family's weight init (from_config) or are skipped by the loader.
            reshape_layers(self, self.config)
            super().post_init()

        def _get_static_cache_init_shape(self):
            # generate() pre-allocates a StaticCache from the config's global KV head count
            # when it initialises the cache eagerly (prefill_chunk_size); give it per-layer
            # counts. The lazy path reads the key shapes and needs no help.
            shape = super()._get_static_cache_init_shape()
            shapes = layer_shapes(self.config)
            if shape is None or shapes is None:
                return shape
            if (getattr(self, "_tp_size", None) or 1) > 1:
                return None     # per-rank counts unknown here: the cache allocates lazily
            return [s["num_key_value_heads"] for s in shapes], shape[1]

    for cls, name in ((SlimopsConfig, "SlimopsConfig"), (SlimopsForCausalLM, "SlimopsForCausalLM")):
        cls.__name__ = cls.__qualname__ = name
    return SlimopsConfig, SlimopsForCausalLM


class SlimopsTokenizer(TokenizersBackend):
    """tokenizer.json exactly as saved. transformers 5's AutoTokenizer maps some model_types
    (qwen2) to a family class that rebuilds its own pre-tokenizer and gives other ids; a
    checkpoint whose tokenizer would be swapped that way points tokenizer_config.json's
    auto_map here (without trust_remote_code that same auto_map makes AutoTokenizer fall
    back to the saved tokenizer_class, TokenizersBackend)."""


def family_lines(config_base: type, model_base: type) -> str:
    """The lines a checkpoint appends to this file to bind it to one family."""
    return (f"\n\n# Written by slimops for this checkpoint's family.\n"
            f"from transformers import {config_base.__name__}, {model_base.__name__}  # noqa: E402\n"
            f"SlimopsConfig, SlimopsForCausalLM = make_classes("
            f"{config_base.__name__}, {model_base.__name__})\n")


__all__ = ["SHAPE_KEYS", "head_dim_of", "layer_shapes", "reshape_layer", "reshape_layers",
           "make_classes", "family_lines", "SlimopsTokenizer"]
