"""Loading what the user hands slimops: a local HF folder or a hub id, its family checked
first, then its tokenizer, then its weights, each with one clear error line.

Order matters for the user: an unsupported family is said before anything else (not a
confusing failure three steps later), a folder without a tokenizer is said as such (not
"the calibration text has 0 tokens"), unreadable weights name the file and the likely cause.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer

from .models import family_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Files any HF tokenizer is saved as (fast, sentencepiece, BPE/WordPiece vocabularies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def resolve_model_path(name: str) -> str:
    """A local folder, or something that looks like a hub id (org/name); else a clear error."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return str(path)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(
            f"model path {name!r} does not exist (give a HF model folder or a hub id like org/name)"
        )
    return name


def model_config(name: str):
    """The model's HF config, its family checked: unsupported families fail here, first."""
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, json.JSONDecodeError) as exc:  # unknown model_type, broken JSON
        raise ValueError(f"cannot read the config of {path}: {exc}") from None
    family_spec(getattr(config, "slimops_base_model_type", None) or config.model_type)
    return config


def load_tokenizer(name: str):
    """The model's tokenizer; a local folder without one is a clear error."""
    path = resolve_model_path(name)
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {folder} has no tokenizer (none of "
            f"{', '.join(TOKENIZER_FILES)}): save the tokenizer beside the "
            "model (tokenizer.save_pretrained(folder))"
        )
    return AutoTokenizer.from_pretrained(path)


def load_model(name: str, dtype: str = "fp32"):
    """(model, tokenizer) on the CPU; slimops checkpoints (per-layer shapes) load without
    remote code. The family is checked before any weights are read."""
    from .checkpoint import load as load_checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    config = model_config(name)
    path = resolve_model_path(name)
    try:
        if getattr(config, "slimops_layers", None) is not None:
            return load_checkpoint(path, device="cpu", dtype=DTYPES[dtype])
        auto_cls = getattr(transformers, family_spec(config.model_type)["auto_class"])
        model = auto_cls.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    except SafetensorError as exc:
        raise ValueError(
            f"the weights of {path} are unreadable ({exc}): the .safetensors "
            "file is truncated or corrupt; download or save it again"
        ) from None
    return model, load_tokenizer(path)
