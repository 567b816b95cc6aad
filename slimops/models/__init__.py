"""Model families: which ones slimops supports (remote_modeling.FAMILY_SPECS, found by
`config.model_type`) and the adapter class for each kind of family."""

from __future__ import annotations

from .base import DecoderAdapter
from .bert import BertAdapter
from .remote_modeling import FAMILY_SPECS, family_spec

# One adapter class per kind of family in FAMILY_SPECS.
ADAPTERS = {"llama-like": DecoderAdapter, "bert-like": BertAdapter}


def supported_families() -> list[str]:
    return sorted(FAMILY_SPECS)


def adapter_class(model_type: str | None) -> type[DecoderAdapter]:
    """The adapter class of a family; a clear error naming the supported ones otherwise."""
    return ADAPTERS[family_spec(model_type)["kind"]]


def get_adapter(model) -> DecoderAdapter:
    adapter = adapter_class(getattr(model.config, "model_type", None))(model)
    adapter.check_geometry()
    return adapter


def stock_class(model_or_class) -> type:
    """The transformers class a model derives from: LlamaForCausalLM for a dense LLaMA and for
    a per-layer-shaped checkpoint's SlimopsForCausalLM (its subclass) alike."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for base in cls.__mro__:
        if base.__module__.startswith("transformers.models."):
            return base
    raise ValueError(f"{cls.__name__} derives from no transformers model class")
