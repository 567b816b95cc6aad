"""Save and load pruned checkpoints whose layers differ in head count and FFN width.

A checkpoint is a normal HF folder. When every layer has one shape that the family's stock
config accepts (and no bias the stock family lacks), it is a plain stock checkpoint.
Otherwise config.json keeps the dense global values plus `slimops_layers` (per-layer
shapes and extra biases) and an `auto_map` to `modeling_slimops.py`, a verbatim copy of
slimops/models/remote_modeling.py, so `AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` (`AutoModel` for BERT-style encoders) works without slimops.
Writes are atomic: everything goes to a temp dir beside the target, then one rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

from .models import get_adapter, stock_class
from .models import remote_modeling as remote
from .readers import read_json

REMOTE_FILE = "modeling_slimops.py"
REMOTE_MODULE = REMOTE_FILE.removesuffix(".py")
PLAN_FILE, INFO_FILE = "slimops_plan.json", "slimops_info.json"
# Keys this module owns in config.json; recomputed from the model on every save.
_OWN_KEYS = ("slimops_layers", "slimops_base_model_type", "slimops_base_class", "auto_map")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Letters, digits, whitespace runs, newlines, non-ASCII: where pre-tokenizers differ.
_PROBE_TEXT = "Hello, World! 12345 3.14159\n\n  def f(x):\treturn x ** 2  # naïve café 東京"


# The auto class each family's default model class comes from, by mapping name.
_AUTO_MAPPINGS = {
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING",
    "AutoModel": "MODEL_MAPPING",
}


def family_classes(model_type: str, class_name: str | None = None) -> tuple[type, type]:
    """The stock (config class, model class) of a family: `class_name` when given (e.g.
    "BertForMaskedLM"), else the family's default (LlamaForCausalLM, BertModel)."""
    config_cls = transformers.CONFIG_MAPPING[model_type]
    if class_name:
        return config_cls, getattr(transformers, class_name)
    auto = remote.family_spec(model_type)["auto_class"]
    return config_cls, getattr(transformers, _AUTO_MAPPINGS[auto])[config_cls]


def auto_class_name(config_cls: type, model_cls: type) -> str:
    """The Auto class that loads `model_cls`: BertModel -> AutoModel, LlamaForCausalLM ->
    AutoModelForCausalLM, BertForMaskedLM -> AutoModelForMaskedLM."""
    suffix = model_cls.__name__.removeprefix(config_cls.__name__.removesuffix("Config"))
    name = f"AutoModel{suffix}" if suffix.startswith("For") else "AutoModel"
    return name if hasattr(transformers, name) else "AutoModel"


@torch.no_grad()
def _stock_biases(adapter) -> dict[str, bool]:
    """Which projections carry a bias in a freshly built stock layer of this config
    (built on the meta device: no memory, no init cost)."""
    layer = adapter.layers()[0]
    with torch.device("meta"):
        try:
            stock = type(layer)(adapter.config, layer_idx=0)
        except TypeError:
            stock = type(layer)(adapter.config)
    return {
        role: adapter.linear(stock, role).bias is not None
        for role, path in adapter.paths.items()
        if path is not None
    }


def model_layer_shapes(model) -> list[dict]:
    """Per-layer shapes read from the modules themselves (the plan may be stale), plus
    "<role>_proj_bias" where a projection's bias differs from the stock family's (FLAP
    folds removed channels into an o_proj / down_proj bias LLaMA does not have)."""
    adapter = get_adapter(model)
    stock = _stock_biases(adapter)
    shapes = []
    for layer in adapter.layers():
        shape = dict(zip(remote.SHAPE_KEYS, adapter.layer_shape(layer)))
        for role, stock_has in stock.items():
            has = adapter.linear(layer, role).bias is not None
            if has != stock_has:
                shape[remote.bias_key(role)] = has
        shapes.append(shape)
    return shapes


def _stock_config(
    config_dict: dict, shapes: list[dict], head_dim: int, model_cls: type
) -> dict | None:
    """config.json for a plain stock checkpoint, or None when the stock config can't say it."""
    if any(s != shapes[0] for s in shapes) or set(shapes[0]) != set(remote.SHAPE_KEYS):
        return None  # per-layer shapes, or biases the stock family lacks
    spec = remote.family_spec(config_dict["model_type"])
    # Only keys the family's config has (BertConfig: no num_key_value_heads, no head_dim).
    candidate = {**config_dict, **{k: shapes[0][k] for k in spec["config_keys"]}}
    if spec["explicit_head_dim"]:
        candidate["head_dim"] = head_dim
    config_cls = family_classes(config_dict["model_type"])[0]
    try:  # the family's own validators decide (LlamaConfig: hidden % heads == 0)
        config = config_cls.from_dict(candidate)
    except Exception:  # noqa: BLE001  (strict-dataclass validators raise several types)
        return None
    # BERT derives attention_head_size = hidden // heads: a head-pruned BERT only fits
    # when that still equals the real head width (and divides evenly).
    if not spec["explicit_head_dim"] and (
        config.hidden_size % shapes[0]["num_attention_heads"]
        or remote.head_dim_of(config) != head_dim
    ):
        return None
    return {**candidate, "architectures": [model_cls.__name__]}


def _remote_config(
    config_dict: dict, shapes: list[dict], head_dim: int, config_cls: type, model_cls: type
) -> dict:
    name = remote.class_name(config_cls, model_cls)
    return {
        **config_dict,
        "head_dim": head_dim,
        "slimops_layers": shapes,
        "slimops_base_model_type": config_dict["model_type"],
        "slimops_base_class": model_cls.__name__,
        "architectures": [name],
        "auto_map": {
            "AutoConfig": f"{REMOTE_MODULE}.SlimopsConfig",
            auto_class_name(config_cls, model_cls): f"{REMOTE_MODULE}.{name}",
        },
    }


def _remote_source(config_cls: type, model_cls: type) -> str:
    return Path(remote.__file__).read_text() + remote.family_lines(config_cls, model_cls)


def _tokenizer_fingerprint(tokenizer) -> tuple:
    return tuple(tokenizer(_PROBE_TEXT)["input_ids"]), len(tokenizer)


def _auto_tokenizer_fingerprint(folder: Path) -> tuple:
    return _tokenizer_fingerprint(AutoTokenizer.from_pretrained(folder))


def _redirect_auto_tokenizer(folder: Path) -> None:
    """Point tokenizer_config.json's auto_map at modeling_slimops.SlimopsTokenizer."""
    path = folder / "tokenizer_config.json"
    tok_config = json.loads(path.read_text())
    tok_config["auto_map"] = {"AutoTokenizer": [None, f"{REMOTE_MODULE}.SlimopsTokenizer"]}
    path.write_text(json.dumps(tok_config, indent=2) + "\n")


def _save_tokenizer(folder: Path, tokenizer) -> bool:
    """Save the tokenizer so AutoTokenizer gives the same ids; True if it needs the remote file.

    transformers 5 picks the tokenizer class from config.model_type for some families
    (qwen2 -> Qwen2Tokenizer, whatever tokenizer_config.json says), which re-tokenizes
    with its own pre-tokenizer: same text, other ids, no error (ARCHITECTURE.md, pitfalls).
    """
    tokenizer.save_pretrained(folder)
    want = _tokenizer_fingerprint(tokenizer)
    if _auto_tokenizer_fingerprint(folder) == want:
        return False
    if type(tokenizer).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        _redirect_auto_tokenizer(folder)
        if _auto_tokenizer_fingerprint(folder) == want:
            return True
    raise ValueError(
        f"AutoTokenizer.from_pretrained on the saved checkpoint gives other token "
        f"ids than the {type(tokenizer).__name__} passed in (model_type "
        "decides the class in transformers 5); save without tokenizer= and ship "
        "the tokenizer separately, or pass the family's own tokenizer class"
    )


def _write_checkpoint(tmp: Path, model, tokenizer, plan, extra_info, extra_files) -> None:
    adapter = get_adapter(model)
    shapes = model_layer_shapes(model)
    model.save_pretrained(tmp)
    finish_folder(
        tmp,
        adapter.family,
        stock_class(model),
        shapes,
        adapter.head_dim,
        tokenizer,
        plan,
        extra_info,
        extra_files,
    )


def finish_folder(
    tmp: Path,
    family: str,
    model_cls: type,
    shapes: list[dict],
    head_dim: int,
    tokenizer=None,
    plan=None,
    extra_info=None,
    extra_files=None,
) -> None:
    """Turn a folder holding the weights and a dense config.json into a slimops checkpoint:
    per-layer shapes (or a plain stock config), remote modeling file, tokenizer, plan, info.
    Shared by save_pruned and streaming.py's layer-by-layer writer."""
    config_cls = family_classes(family)[0]
    config_path = tmp / "config.json"
    config_dict = json.loads(config_path.read_text())
    for key in _OWN_KEYS:
        config_dict.pop(key, None)
    config_dict = _stock_config(config_dict, shapes, head_dim, model_cls) or _remote_config(
        config_dict, shapes, head_dim, config_cls, model_cls
    )
    config_path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    # config.json first: AutoTokenizer reads its model_type in the check.
    tokenizer_needs_remote = tokenizer is not None and _save_tokenizer(tmp, tokenizer)
    remote_file = tmp / REMOTE_FILE
    if "auto_map" in config_dict or tokenizer_needs_remote:
        remote_file.write_text(_remote_source(config_cls, model_cls))
    elif remote_file.exists():  # save_pretrained copies it when re-saving a remote-code model
        remote_file.unlink()
    if plan is not None:
        (tmp / PLAN_FILE).write_text(plan.to_json())
    if extra_info is not None:
        (tmp / INFO_FILE).write_text(json.dumps(extra_info, indent=2, default=str))
    for name, data in (extra_files or {}).items():
        (tmp / name).write_bytes(data)


def _is_occupied(path: Path) -> bool:
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if not _is_occupied(out):
        if out.exists():
            out.rmdir()  # an empty dir: rename cannot replace it on every OS
        os.rename(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(f"{out} appeared during the save; pass overwrite=True to replace it")
    aside = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, aside)  # old kept whole until the new one is in place
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    _remove(aside)


def save_pruned(
    model,
    out_dir,
    tokenizer=None,
    plan=None,
    extra_info=None,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write `model` (sliced, per-layer shapes) as a loadable HF folder; returns its path.

    extra_files: name -> bytes written into the folder too (e.g. search's Pareto plot).
    Raises FileExistsError before any work when out_dir exists and is non-empty, unless
    overwrite=True (then the old folder is replaced atomically). A failure or interrupt
    midway leaves neither out_dir nor a temp dir behind.
    """
    with atomic_folder(out_dir, overwrite) as tmp:
        _write_checkpoint(tmp, model, tokenizer, plan, extra_info, extra_files)
    return Path(out_dir).expanduser().absolute()


@contextmanager
def atomic_folder(out_dir, overwrite: bool = False):
    """Yield a temp folder beside out_dir; on success it becomes out_dir in one rename, on
    any failure or interrupt it is removed. FileExistsError first if out_dir is taken."""
    out = Path(out_dir).expanduser().absolute()
    if _is_occupied(out) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; pass overwrite=True to replace it "
            "or choose another folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same filesystem as out_dir, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _move_into_place(tmp, out, overwrite)
    except BaseException:  # KeyboardInterrupt included: never leave a half save
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(path, device="cpu", dtype=None):
    """(model, tokenizer or None) from a slimops checkpoint or any plain HF folder of a
    supported family (a causal LM, or e.g. BertModel for encoders), without remote code.
    dtype=None keeps the saved dtype."""
    path = Path(path).expanduser()
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a HF model folder")
    raw = read_json(config_path)  # a corrupt one: one line naming it
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if "slimops_layers" in raw:
        family = raw.get("slimops_base_model_type") or raw["model_type"]
        # The same classes the checkpoint's modeling_slimops.py defines: one source of truth.
        _, model_cls = remote.make_classes(*family_classes(family, raw.get("slimops_base_class")))
        model = model_cls.from_pretrained(path, **kwargs)
    else:
        model = _plain_class(raw).from_pretrained(path, trust_remote_code=False, **kwargs)
    return model.to(device).eval(), _load_tokenizer(path)


def _plain_class(raw: dict):
    """The class a plain folder was saved from (config "architectures"), else the family's
    auto class (AutoModelForCausalLM for decoders, AutoModel for encoders)."""
    arch = (raw.get("architectures") or [None])[0]
    if arch and isinstance(getattr(transformers, arch, None), type):
        return getattr(transformers, arch)
    try:
        return getattr(transformers, remote.family_spec(raw.get("model_type"))["auto_class"])
    except ValueError:  # not a slimops family: still a plain causal LM folder
        return transformers.AutoModelForCausalLM


def _load_tokenizer(path: Path):
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path)
