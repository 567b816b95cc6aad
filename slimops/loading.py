"""Loading what the user hands slimops: a local HF folder, a hub id or a GGUF file, its family
checked first, then its tokenizer, then its weights, each with one clear error line.

Order matters for the user: an unsupported family is said before anything else (not a
confusing failure three steps later), a folder without a tokenizer is said as such (not
"the calibration text has 0 tokens"), unreadable weights name the file and the likely cause.

GGUF (llama.cpp's single-file format, often quantised): `model.gguf`, or a folder plus
`gguf_file=NAME`. The family comes from the header's `general.architecture` (read up to that
key only); transformers then builds the config and tokenizer from the metadata and
de-quantises the weights into a plain model, so a pruned GGUF saves as a normal checkpoint.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import os
import struct
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer

from .models import family_spec
from .readers import MODEL_JSON, TOKENIZER_JSON, check_folder_json

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
GGUF_SUFFIX = ".gguf"


def resolve_model_path(name: str, gguf_file: str | None = None) -> str:
    """A local folder, a local .gguf file (`name` itself, or `gguf_file` inside the folder
    `name`), or something that looks like a hub id (org/name); else a clear error."""
    path = Path(name).expanduser()
    if gguf_file is not None:
        return _gguf_path(path / gguf_file, f"--gguf-file {gguf_file!r} in {name!r}")
    if path.suffix.lower() == GGUF_SUFFIX:
        return _gguf_path(path, f"model path {name!r}")
    if path.exists():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}")) if path.is_dir() else []
            hint = (
                f" (it holds {', '.join(ggufs)}: pass the .gguf path, or --gguf-file NAME)"
                if ggufs
                else ""
            )
            raise FileNotFoundError(f"model folder {path} has no config.json{hint}")
        return str(path)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(
            f"model path {name!r} does not exist (give a HF model folder, a .gguf file or a "
            "hub id like org/name)"
        )
    return name


def _gguf_path(path: Path, what: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what}: no GGUF file at {path} (GGUF input must be a local file; download it first)"
        )
    return str(path)


def is_gguf(path: str) -> bool:
    """Whether a resolved model path is a GGUF file (resolve_model_path checked it exists)."""
    return path.lower().endswith(GGUF_SUFFIX)


# --- GGUF header: the architecture and the file's size, without transformers --------------

# GGUF value type -> struct format (uint8 .. float64); 8 is a string, 9 an array.
_GGUF_SCALARS = dict(enumerate("BbHhIif?")) | {10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_DEFAULT_ALIGNMENT = 32  # the spec's value when general.alignment is absent


def _read(f, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack(fmt, data)[0]


def _check_left(f, size: int) -> None:
    """A corrupt length past the end of the file is EOFError, not a huge read or seek."""
    if size > os.fstat(f.fileno()).st_size - f.tell():
        raise EOFError


def _skip(f, size: int) -> None:
    _check_left(f, size)
    f.seek(size, 1)


def _read_string(f) -> str:
    size = _read(f, "<Q")
    _check_left(f, size)
    return f.read(size).decode("utf-8", errors="replace")


def _skip_value(f, kind: int) -> None:
    if kind in _GGUF_SCALARS:
        _skip(f, struct.calcsize("<" + _GGUF_SCALARS[kind]))
    elif kind == _GGUF_STRING:
        _skip(f, _read(f, "<Q"))
    elif kind == _GGUF_ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        if item in _GGUF_SCALARS:
            _skip(f, count * struct.calcsize("<" + _GGUF_SCALARS[item]))
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def _tensor_bytes(dims: list[int], ggml_type: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown GGUF tensor type {ggml_type}") from None
    return math.prod(dims) // block * type_size


def read_gguf_header(path: str) -> str:
    """`general.architecture` of a GGUF file (v2/v3, little-endian), after checking that the
    whole header parses and the file holds every tensor's bytes: a truncated or corrupt file
    is one line here, not a numpy reshape error deep inside transformers. Reads only the
    header (~0.1 s for a 49k-token vocabulary; transformers' parse takes ~10 s)."""
    size = Path(path).stat().st_size
    arch, alignment, data_end = None, _GGUF_DEFAULT_ALIGNMENT, 0
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError("not a GGUF file (it does not start with 'GGUF')")
            version = _read(f, "<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
            tensors, keys = _read(f, "<Q"), _read(f, "<Q")
            for _ in range(keys):
                key, kind = _read_string(f), _read(f, "<I")
                if key == "general.architecture" and kind == _GGUF_STRING:
                    arch = _read_string(f)
                elif key == "general.alignment" and kind == 4:  # uint32
                    alignment = _read(f, "<I")
                else:
                    _skip_value(f, kind)
            for _ in range(tensors):
                _read_string(f)  # name
                dims = [_read(f, "<Q") for _ in range(_read(f, "<I"))]
                ggml_type, offset = _read(f, "<I"), _read(f, "<Q")
                data_end = max(data_end, offset + _tensor_bytes(dims, ggml_type))
            data_start = -(-f.tell() // alignment) * alignment
    except EOFError:
        raise ValueError(
            f"{path}: truncated at byte {size} (the GGUF header runs past the end of the "
            "file: cut short or corrupt)"
        ) from None
    except ValueError as exc:  # an unknown type, a bad magic or version
        raise ValueError(f"{path}: {exc}") from None
    if data_start + data_end > size:
        raise ValueError(
            f"{path}: truncated at byte {size} (its tensors end at byte {data_start + data_end})"
        )
    if arch is None:
        raise ValueError(f"{path}: the GGUF header has no general.architecture")
    return arch


def _check_gguf_family(path: str) -> None:
    _require_gguf()
    _checked_gguf_family(_file_stamp(path))


@functools.lru_cache(maxsize=4)
def _checked_gguf_family(stamp: tuple) -> None:  # once per file version
    path = stamp[0]
    arch = read_gguf_header(path)
    try:
        family_spec(arch)
    except ValueError as exc:
        raise ValueError(f"{path}: GGUF architecture {arch!r}: {exc}") from None


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading a .gguf file needs the gguf package: pip install gguf")


# transformers parses the whole GGUF metadata for the config and again for the tokenizer
# (~10 s each for SmolLM2's vocabulary on a busy 2-core CPU); the prune flow asks for both
# twice, so each is read once per file version and handed out as copies.
def _file_stamp(path: str) -> tuple:
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _gguf_config(stamp: tuple):
    file = Path(stamp[0])
    try:
        return AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    except (ValueError, KeyError) as exc:  # an architecture transformers cannot read
        raise ValueError(f"cannot read the GGUF metadata of {file}: {exc}") from None


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(stamp: tuple):
    file = Path(stamp[0])
    try:
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"cannot build the tokenizer of {file} from its metadata: {exc}") from None


def _load_gguf_model(path: str, config, dtype: torch.dtype):
    """A plain (de-quantised, serialisable) model from a GGUF file."""
    file = Path(path)
    kwargs = {}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # unpack every weight: plain nn.Linear even where `kernels`
        kwargs["quantization_config"] = gguf_config(dequantize=True)  # could keep GGUF blocks
    auto_cls = getattr(transformers, family_spec(config.model_type)["auto_class"])
    model = auto_cls.from_pretrained(
        str(file.parent), gguf_file=file.name, config=config, dtype=dtype, **kwargs
    ).eval()
    # The weights are dense now; what is left of the GGUF "quantisation" only makes
    # save_pretrained refuse ("quantized with gguf ... not serializable").
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    packed = {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
    if packed:
        raise ValueError(
            f"{path}: transformers kept GGUF-packed layers ({', '.join(sorted(packed))}); "
            "slimops needs de-quantised weights (upgrade transformers)"
        )
    return model


# --- the loaders ---------------------------------------------------------------------------


def model_config(name: str, gguf_file: str | None = None):
    """The model's HF config, its family checked: unsupported families fail here, first."""
    path = resolve_model_path(name, gguf_file)
    if is_gguf(path):
        _check_gguf_family(path)  # before transformers parses the whole metadata
        config = copy.deepcopy(_gguf_config(_file_stamp(path)))
    else:
        check_folder_json(path, MODEL_JSON)
        try:
            config = AutoConfig.from_pretrained(path)
        except ValueError as exc:  # an unknown model_type (broken JSON was named above)
            raise ValueError(f"cannot read the config of {path}: {exc}") from None
    family_spec(getattr(config, "slimops_base_model_type", None) or config.model_type)
    return config


def load_tokenizer(name: str, gguf_file: str | None = None):
    """The model's tokenizer; a local folder without one is a clear error."""
    path = resolve_model_path(name, gguf_file)
    if is_gguf(path):
        _check_gguf_family(path)
        return copy.deepcopy(_gguf_tokenizer(_file_stamp(path)))
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {folder} has no tokenizer (none of "
            f"{', '.join(TOKENIZER_FILES)}): save the tokenizer beside the "
            "model (tokenizer.save_pretrained(folder))"
        )
    check_folder_json(folder, TOKENIZER_JSON)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 (the Rust tokenizers library raises bare Exception)
        # JSON that parses but is no tokenizer, a missing vocabulary file, ...
        raise ValueError(f"cannot build the tokenizer of {path}: {exc}") from exc


def load_model(name: str, dtype: str = "fp32", gguf_file: str | None = None):
    """(model, tokenizer) on the CPU; slimops checkpoints (per-layer shapes) load without
    remote code, GGUF files de-quantised to `dtype`. The family is checked before any
    weights are read."""
    from .checkpoint import load as load_checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    config = model_config(name, gguf_file)
    path = resolve_model_path(name, gguf_file)
    try:
        if is_gguf(path):
            model = _load_gguf_model(path, config, DTYPES[dtype])
        elif getattr(config, "slimops_layers", None) is not None:
            return load_checkpoint(path, device="cpu", dtype=DTYPES[dtype])
        else:
            auto_cls = getattr(transformers, family_spec(config.model_type)["auto_class"])
            model = auto_cls.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    except SafetensorError as exc:
        raise ValueError(
            f"the weights of {path} are unreadable ({exc}): the .safetensors "
            "file is truncated or corrupt; download or save it again"
        ) from None
    return model, load_tokenizer(path)
