"""Per-layer-shaped models for pruned checkpoints, loadable WITHOUT slimops installed.

This file is copied verbatim into every per-layer checkpoint as `modeling_slimops.py`, so
it imports only torch, transformers and the standard library (never slimops). The
checkpoint writer appends two lines naming the family and model class, e.g.

    from transformers import LlamaConfig, LlamaForCausalLM
    SlimopsConfig, SlimopsForCausalLM = make_classes(LlamaConfig, LlamaForCausalLM)
    (or: SlimopsConfig, SlimopsModel = make_classes(BertConfig, BertModel))

and config.json's `auto_map` points AutoConfig / AutoModelForCausalLM (AutoModel for
BERT-style encoders) at those names.

config.json keeps the family's original dense values (num_attention_heads, ...), so the
stock config validators pass (transformers 5.23's LlamaConfig refuses hidden_size %
num_attention_heads != 0 even with an explicit head_dim), plus `slimops_layers`: one
{"num_attention_heads", "num_key_value_heads", "intermediate_size"} dict per layer, with
"<role>_proj_bias" entries where a projection's bias differs from the stock family's.
The model class builds the stock family model and swaps each layer's projections for
the pruned shapes before any weight is loaded or initialised. Which modules to swap comes
from a per-family table (LLaMA-like decoders, BERT-like encoders), chosen by the
`slimops_base_model_type` recorded in the config.

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
except ImportError:  # transformers 4: the same role under its old name
    from transformers import PreTrainedTokenizerFast as TokenizersBackend

SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
HEAD_KEYS = ("num_attention_heads", "num_key_value_heads")  # widths in heads x head_dim
# The one table of supported families: model_type -> spec. A spec says where the layers
# and the final norm sit inside model.base_model, the attention module whose head-count
# attributes the stock forward reads, whether the stock config honours an explicit
# head_dim, which shape keys its config has, the Auto class that loads it, and each
# projection as role -> (dotted path inside one layer, side whose width changes, shape key
# giving the width). slimops' adapters derive everything from it (slimops/models), so a new
# LLaMA-like family is one row here.
#
# fmt: off
# (tables: one row a line reads better than one value a line)
ROLE_SIDES = {  # role -> (side pruning narrows, shape key giving that width)
    "q": ("out", "num_attention_heads"), "k": ("out", "num_key_value_heads"),
    "v": ("out", "num_key_value_heads"), "o": ("in", "num_attention_heads"),
    "gate": ("out", "intermediate_size"), "up": ("out", "intermediate_size"),
    "down": ("in", "intermediate_size"),
}


def _spec(kind, layers, attention, final_norm, explicit_head_dim, config_keys, auto_class, **paths):
    return {
        "kind": kind, "layers": layers, "attention": attention, "final_norm": final_norm,
        "explicit_head_dim": explicit_head_dim, "config_keys": config_keys,
        "auto_class": auto_class,
        "projections": {role: (path, *ROLE_SIDES[role]) for role, path in paths.items()},
    }


LLAMA_LIKE = _spec(
    "llama-like", "layers", "self_attn", "norm", True, SHAPE_KEYS, "AutoModelForCausalLM",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
)
# BERT-style encoders: post-LayerNorm MHA (each layer ends normed: no final norm), biases
# everywhere, a plain GELU FFN (no gate). BertConfig ignores head_dim: attention_head_size
# is always hidden_size // heads.
BERT_LIKE = _spec(
    "bert-like", "encoder.layer", "attention.self", None, False,
    ("num_attention_heads", "intermediate_size"), "AutoModel",
    q="attention.self.query", k="attention.self.key", v="attention.self.value",
    o="attention.output.dense", up="intermediate.dense", down="output.dense",
)
# fmt: on
# Qwen2 adds q/k/v biases, Qwen3 per-head q_norm/k_norm over head_dim (shared by all heads,
# so head pruning leaves them untouched); Mistral is LLaMA with sliding-window attention.
FAMILY_SPECS = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "bert": BERT_LIKE,
}


def family_spec(model_type: str) -> dict:
    try:
        return FAMILY_SPECS[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model family {model_type!r}; slimops supports "
            f"{', '.join(sorted(FAMILY_SPECS))}"
        ) from None


def bias_key(role: str) -> str:
    """Per-layer shape key recording a bias the stock family lacks (True) or has (False),
    e.g. "o_proj_bias": FLAP folds removed channels' mean output into o_proj/down_proj."""
    return f"{role}_proj_bias"


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def base_model_type(config) -> str:
    return getattr(config, "slimops_base_model_type", None) or config.model_type


def layer_shapes(config) -> list[dict] | None:
    """The per-layer shapes recorded in the config, checked; None for a dense config."""
    shapes = getattr(config, "slimops_layers", None)
    if shapes is None:
        return None
    if len(shapes) != config.num_hidden_layers:
        raise ValueError(
            f"slimops_layers lists {len(shapes)} layers but num_hidden_layers is "
            f"{config.num_hidden_layers}: the config.json is inconsistent"
        )
    for i, shape in enumerate(shapes):
        missing = [k for k in SHAPE_KEYS if not shape.get(k)]
        if missing:
            raise ValueError(f"slimops_layers[{i}] lacks positive {missing}")
        if shape["num_attention_heads"] % shape["num_key_value_heads"]:
            raise ValueError(
                f"slimops_layers[{i}]: {shape['num_attention_heads']} query heads "
                f"is not a multiple of {shape['num_key_value_heads']} KV heads"
            )
    return shapes


def _resized(linear: nn.Linear, side: str, width: int, bias: bool | None) -> nn.Linear:
    """An uninitialised nn.Linear like `linear` with its in or out side set to `width` and
    a bias iff `bias` (None: as the stock module)."""
    in_f, out_f = (width, linear.out_features) if side == "in" else (linear.in_features, width)
    has_bias = linear.bias is not None if bias is None else bool(bias)
    if (in_f, out_f, has_bias) == (
        linear.in_features,
        linear.out_features,
        linear.bias is not None,
    ):
        return linear
    # Same device/dtype as the stock module: meta inside from_pretrained, the load dtype.
    return nn.Linear(
        in_f, out_f, bias=has_bias, device=linear.weight.device, dtype=linear.weight.dtype
    )


def set_attention_geometry(attn: nn.Module, num_heads: int, num_kv: int, head_dim: int) -> None:
    """Tell the stock attention module its per-layer head counts: HF's LLaMA-like attention
    reads repeat_kv's factor from num_key_value_groups, BERT's reshape from
    num_attention_heads / all_head_size. Only attributes the module has are set."""
    values = {
        "num_key_value_groups": num_heads // num_kv,
        "num_heads": num_heads,
        "num_key_value_heads": num_kv,
        "num_attention_heads": num_heads,
        "all_head_size": num_heads * head_dim,
    }
    for attr, val in values.items():
        if hasattr(attn, attr):
            setattr(attn, attr, val)


def reshape_layer(layer: nn.Module, shape: dict, head_dim: int, spec: dict = LLAMA_LIKE) -> None:
    """Give one layer the projection shapes (and biases) of `shape`; weights left to the loader."""
    for role, (path, side, key) in spec["projections"].items():
        parent_path, _, name = path.rpartition(".")
        parent = layer.get_submodule(parent_path)
        width = shape[key] * (head_dim if key in HEAD_KEYS else 1)
        setattr(
            parent, name, _resized(getattr(parent, name), side, width, shape.get(bias_key(role)))
        )
    set_attention_geometry(
        layer.get_submodule(spec["attention"]),
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        head_dim,
    )


def reshape_layers(model: nn.Module, config) -> nn.Module:
    """Reshape every layer of a stock family model to config.slimops_layers."""
    shapes = layer_shapes(config)
    if shapes is None:
        return model
    spec = family_spec(base_model_type(config))
    layers = getattr(model, "base_model", model).get_submodule(spec["layers"])
    if len(layers) != len(shapes):
        raise ValueError(f"model has {len(layers)} layers, slimops_layers lists {len(shapes)}")
    hd = head_dim_of(config)
    for layer, shape in zip(layers, shapes):
        reshape_layer(layer, shape, hd, spec)
    return model


def class_name(config_base: type, model_base: type) -> str:
    """SlimopsForCausalLM for LlamaForCausalLM, SlimopsModel for BertModel, ..."""
    family = config_base.__name__.removesuffix("Config")
    return "Slimops" + model_base.__name__.removeprefix(family)


@functools.cache
def make_classes(config_base: type, model_base: type) -> tuple[type, type]:
    """(config class, model class) for one family, e.g. (LlamaConfig, LlamaForCausalLM) or
    (BertConfig, BertModel).

    The config keeps the family's model_type, so AutoTokenizer and tools that dispatch on
    model_type treat the checkpoint as that family; its own class (not the stock one)
    keeps AutoModel*.register from remapping the stock config class.
    """

    class SlimopsConfig(config_base):
        pass

    class SlimopsModel(model_base):
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
                return None  # per-rank counts unknown here: the cache allocates lazily
            return [s["num_key_value_heads"] for s in shapes], shape[1]

    for cls, name in (
        (SlimopsConfig, "SlimopsConfig"),
        (SlimopsModel, class_name(config_base, model_base)),
    ):
        cls.__name__ = cls.__qualname__ = name
    return SlimopsConfig, SlimopsModel


class SlimopsTokenizer(TokenizersBackend):
    """tokenizer.json exactly as saved. transformers 5's AutoTokenizer maps some model_types
    (qwen2) to a family class that rebuilds its own pre-tokenizer and gives other ids; a
    checkpoint whose tokenizer would be swapped that way points tokenizer_config.json's
    auto_map here (without trust_remote_code that same auto_map makes AutoTokenizer fall
    back to the saved tokenizer_class, TokenizersBackend)."""


def family_lines(config_base: type, model_base: type) -> str:
    """The lines a checkpoint appends to this file to bind it to one family and class."""
    name = class_name(config_base, model_base)
    return (
        f"\n\n# Written by slimops for this checkpoint's family.\n"
        f"from transformers import {config_base.__name__}, {model_base.__name__}  # noqa: E402\n"
        f"SlimopsConfig, {name} = make_classes("
        f"{config_base.__name__}, {model_base.__name__})\n"
    )


__all__ = [
    "SHAPE_KEYS",
    "FAMILY_SPECS",
    "family_spec",
    "bias_key",
    "head_dim_of",
    "layer_shapes",
    "reshape_layer",
    "reshape_layers",
    "class_name",
    "make_classes",
    "family_lines",
    "SlimopsTokenizer",
]
