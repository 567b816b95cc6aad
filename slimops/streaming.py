"""Prune models larger than memory: one decoder layer in memory at a time (`--stream`).

The model is built on the meta device (no memory); the modules outside the layers
(embeddings, final norm, rotary tables, lm_head) are read from the safetensors shards. The
sequential driver then asks `ShardSource` for each layer: it is read from the shards, pruned
on the compute device, sliced, written to the output folder as its own shard and dropped
back to meta before the next one is read. Peak host memory is about one layer (twice while
it is sliced) plus its OBS state and the calibration activations, never the whole model.
The output folder is a normal checkpoint (sharded safetensors + index, per-layer config),
written atomically like save_pruned.

This is a layer source of the one pipeline (pipeline.prune_model(..., source=ShardSource)),
not a pipeline of its own. slimgpt with a formula schedule (log, linear, uniform, a list)
streams: each layer is decided from its own inputs (PruneConfig.streams). Methods and
schedules that need every layer at once (flap's global threshold, taylor's gradients,
search's fitness, schedule "obs") do not.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .checkpoint import atomic_folder, finish_folder
from .distributed import is_main
from .methods import check_streams
from .models import get_adapter, stock_class
from .pipeline import prune_model
from .readers import read_json
from .slicing import slice_layer

INDEX = "model.safetensors.index.json"


class ShardedWeights:
    """Tensors of a HF folder's safetensors (one file, or shards with an index), read by
    name one at a time (safe_open maps the file; nothing else is loaded)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            self.where = read_json(index)["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.folder} has no model.safetensors or {INDEX}: "
                "--stream reads safetensors only"
            )

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        with safe_open(self.folder / self.where[name], "pt") as f:
            t = f.get_tensor(name)
        self.saved_dtype = t.dtype  # the output is written in the checkpoint's own dtype
        return t if dtype is None else t.to(dtype)


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def meta_model(folder, dtype: torch.dtype, weights: ShardedWeights):
    """The model with its layers on the meta device and everything else read from disk."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = get_adapter(model).layers()
    layer_prefix = _prefix_of(model, layers) + "."
    for name, module in model.named_modules():
        owns = [n for n, _ in module.named_parameters(recurse=False)] + [
            n for n, _ in module.named_buffers(recurse=False)
        ]
        if not owns or (name + ".").startswith(layer_prefix):
            continue
        _materialise(module, name, weights, dtype, config)
    model.tie_weights()
    return model.eval()


def _materialise(module: nn.Module, name: str, weights: ShardedWeights, dtype, config) -> None:
    """Give a non-layer module real tensors: its saved ones; a tied lm_head is left to
    tie_weights; buffers that are never saved (rotary tables) come from a fresh CPU
    instance of the module."""
    own = [k for k in module.state_dict(keep_vars=True) if "." not in k]
    saved = {k: f"{name}.{k}" for k in own if f"{name}.{k}" in weights.where}
    if saved:
        module.to_empty(device="cpu")
        module.load_state_dict({k: weights.get(v, dtype) for k, v in saved.items()}, strict=False)
    elif not list(module.parameters(recurse=False)):
        fresh = type(module)(config=config)  # e.g. LlamaRotaryEmbedding(config)
        for key, buf in fresh.named_buffers(recurse=False):
            setattr(module, key, buf)


class ShardSource:
    """sequential.run_sequential's layer source: read layer i from the shards; after it is
    pruned, slice it to its plan, write it as shard i of the output and free it. With out=None
    (the ranks of a torchrun other than rank 0) nothing is written."""

    def __init__(self, model, weights: ShardedWeights, out: Path | None, dtype: torch.dtype):
        self.adapter = get_adapter(model)
        self.weights, self.out, self.dtype = weights, out, dtype
        self.prefix = _prefix_of(model, self.adapter.layers())
        self.plans: list = []  # set by the method: its per-layer plans
        self.weight_map: dict[str, str] = {}
        self.params: list[int] = []  # per layer, after slicing

    def open(self, i: int, layers: nn.ModuleList, device) -> nn.Module:
        layer = layers[i].to_empty(device="cpu")
        names = {k: f"{self.prefix}.{i}.{k}" for k in layer.state_dict()}
        layer.load_state_dict({k: self.weights.get(v, self.dtype) for k, v in names.items()})
        return layer.to(device)

    def close(self, i: int, layers: nn.ModuleList, layer: nn.Module, work) -> None:
        slice_layer(self.adapter, layer, work.plan if hasattr(work, "plan") else self.plans[i])
        tensors = {
            f"{self.prefix}.{i}.{k}": v.detach().to("cpu", self.weights.saved_dtype).contiguous()
            for k, v in layer.state_dict().items()
        }
        self.params.append(sum(p.numel() for p in layer.parameters()))
        if self.out is not None:
            shard = f"model-layer-{i:05d}.safetensors"
            save_file(tensors, str(self.out / shard), metadata={"format": "pt"})
            self.weight_map.update(dict.fromkeys(tensors, shard))
        layers[i] = layer.to("meta")  # the next layer may now be read

    def write_rest(self) -> None:
        """Everything outside the layers, copied tensor by tensor from the source shards."""
        if self.out is None:
            return
        rest = {
            k: self.weights.get(k)
            for k in self.weights.where
            if not k.startswith(self.prefix + ".")
        }
        save_file(rest, str(self.out / "model-rest.safetensors"), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(rest, "model-rest.safetensors"))
        size = sum((self.out / f).stat().st_size for f in set(self.weight_map.values()))
        (self.out / INDEX).write_text(
            json.dumps({"metadata": {"total_size": size}, "weight_map": self.weight_map}, indent=2)
        )


def check_streamable(method: str, cfg, path) -> None:
    """Clear errors, before any work, for what --stream cannot do."""
    check_streams(method, cfg)
    if str(path).endswith(".gguf") or not Path(path).is_dir():
        raise ValueError(f"--stream reads a local folder of safetensors shards, not {path}")


def prune_streamed(
    path,
    tokens: torch.Tensor,
    out,
    tokenizer=None,
    method: str = "slimgpt",
    ratio: float = 0.2,
    schedule=None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress=None,
    **options,
):
    """Prune the checkpoint at `path` into `out` one layer at a time: pipeline.prune_model
    with a ShardSource as its layer source; (plan, report)."""
    weights = ShardedWeights(path)
    model = meta_model(path, dtype, weights)
    # every rank of a torchrun prunes the same layers; rank 0 alone writes --out (the others
    # write nothing at all: no copy of the model in a temp folder)
    folder = atomic_folder(out, overwrite) if is_main() else contextlib.nullcontext()
    with folder as tmp:
        source = ShardSource(model, weights, tmp, dtype)
        plan, report = prune_model(
            model, tokens, method, ratio, schedule, device, progress, source, **options
        )
        source.write_rest()
        if tmp is not None:
            shutil.copy(Path(path) / "config.json", tmp / "config.json")
            family, head_dim = source.adapter.family, source.adapter.head_dim
            finish_folder(tmp, family, stock_class(model), plan.shapes(), head_dim, tokenizer, plan)
    report.info["streamed"] = True
    return plan, report
