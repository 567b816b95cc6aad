"""One adapter per model family, found by `config.model_type`."""
from __future__ import annotations

_ADAPTERS: dict[str, type] = {}


def register(cls):
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_families() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(model_type: str):
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise ValueError(f"unsupported model family {model_type!r}; slimops supports "
                         f"{', '.join(supported_families())}") from None


def get_adapter(model):
    adapter = adapter_class(getattr(model.config, "model_type", None))(model)
    adapter.check_geometry()
    return adapter


from . import bert, llama, qwen  # noqa: E402,F401  (registers the families)
