"""Files a user hands slimops (or a killed run leaves behind), read with one clear line when
they are corrupt: `<file>: what is wrong`, raised as ValueError so the CLI prints it as its
one error line instead of a traceback. JSON (configs, tokenizer files, run state, --target),
token-id tensors (--calib ids.pt) and torch state files. GGUF files are checked in
loading.py (`read_gguf_header`), safetensors where they are opened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# The JSON files of a HF model folder that transformers reads; a broken one otherwise fails
# deep inside transformers with a message that does not name the file.
MODEL_JSON = ("config.json", "generation_config.json", "model.safetensors.index.json")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_json(path) -> Any:
    """The parsed JSON of `path`; a missing file stays FileNotFoundError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "truncated or corrupt?"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text, so not JSON") from None


def check_folder_json(folder, names: tuple[str, ...]) -> None:
    """Parse the JSON files `names` of a model folder that exist (a corrupt one is named
    here, before transformers reports it without the file name)."""
    folder = Path(folder)
    for name in names:
        if (folder / name).is_file():
            read_json(folder / name)


def load_token_ids(path, vocab_size: int) -> torch.Tensor:
    """The 1-D LongTensor in a `torch.save`d ids file, checked: an integer tensor whose ids
    all lie in [0, vocab_size)."""
    path = Path(path)
    try:  # weights_only: a tensor file never needs to run pickled code
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for a bad file)
        raise ValueError(
            f"{path}: not a tensor file written by torch.save ({_first_line(e)})"
        ) from None
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(ids).__name__}, not a tensor of token ids")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{path}: holds {ids.dtype} values, not integer token ids")
    ids = ids.long().reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(
            f"{path}: holds token id {bad}, outside the tokenizer's ids 0..{vocab_size - 1}"
        )
    return ids


def load_state(path) -> Any:
    """A torch state file slimops wrote itself (the trainer's resumable state)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{path}: unreadable ({_first_line(e)}); truncated or corrupt: delete it to start over"
        ) from None


def _first_line(err: BaseException) -> str:
    """`Type: first sentence` of an error (torch's unpickling errors run to a paragraph)."""
    text = str(err).strip().splitlines()
    sentence = text[0].split(". ")[0][:120] if text else ""
    return f"{type(err).__name__}: {sentence}" if sentence else type(err).__name__
