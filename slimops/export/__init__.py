"""Exports of slimops models to serving formats: GGUF for llama.cpp (docs/serving.md).

Importing this package needs only slimops; `gguf` (pip install gguf) is imported when an
export runs, so `slimops --help` works without it."""

from __future__ import annotations

import importlib.util

# Matrix types a GGUF export writes (writer.DTYPES maps each to gguf's own type).
DTYPE_NAMES = ("f32", "f16", "bf16", "q8_0")

__all__ = ["DTYPE_NAMES", "export_gguf"]


def export_gguf(
    model,
    out,
    dtype: str = "f16",
    tokenizer=None,
    tokenizer_from=None,
    overwrite: bool = False,
    name: str | None = None,
) -> dict:
    """Write `model` as one GGUF file llama.cpp runs; returns the report (arch, per-layer
    widths, tensor types, q8_0 matrices kept in f16, file size, notes).

    model: a loaded causal LM (pass its `tokenizer`), or anything `slimops prune` takes as a
    path: a slimops checkpoint, a HF folder, a hub id or a .gguf file. tokenizer_from: a .gguf
    whose tokenizer is copied verbatim (a .gguf model path is its own default).
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("GGUF export needs the gguf package: pip install gguf")
    from .writer import check_dtype, check_target, write_gguf

    check_dtype(dtype)
    target = check_target(out, overwrite)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from ..loading import is_gguf, load_model, resolve_model_path

        path = resolve_model_path(str(model))
        if tokenizer_from is None and is_gguf(path):
            tokenizer_from = path
        model, tokenizer = load_model(path, dtype="fp32")
    return write_gguf(model, target, dtype, tokenizer, tokenizer_from, name)
