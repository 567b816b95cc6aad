"""`export_gguf`: a slimops model (any per-layer widths) -> one GGUF file llama.cpp runs.

Order: check the inputs (dtype, target folder, family) before any weight is converted; pick
the graph (layout.py); convert the tensors layer by layer with a progress bar; write to a
temp file beside the target, fsync, rename (a killed export leaves nothing behind); return a
report of what was written.

dtypes: 1-D tensors (norms, biases, rope factors) are always F32, as llama.cpp's converter
writes them. q8_0 packs rows in blocks of 32 values: a matrix whose row length (its input
width, e.g. a pruned ffn_down's 245 channels) is not a multiple of 32 is written as F16
instead, and the report lists it. `slimops prune --align 32 --no-whole-kv-groups` keeps every
FFN width a multiple of 32, so every matrix quantises: on SmolLM2 at 20% and 50% it cost no
perplexity and served fastest (docs/serving.md).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import get_adapter
from . import DTYPE_NAMES, vocab
from .layout import GGUF_ROLE, arrange_layer, choose_layout

DTYPES = {  # --dtype -> (matrix type, file type)
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
assert tuple(DTYPES) == DTYPE_NAMES
F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16


def check_target(out, overwrite: bool) -> Path:
    out = Path(out).expanduser().absolute()
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"--out {out}: the file name must end in .gguf")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    return out


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


def encode(t: torch.Tensor, want: gguf.GGMLQuantizationType):
    """(array, type written): a 2-D tensor in `want` where its rows allow it, else F16."""
    data = t.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or want == F32:
        return data, F32
    block = gguf.GGML_QUANT_SIZES[want][0]
    if data.shape[-1] % block:
        want = F16  # q8_0 needs rows in whole blocks of 32 (llama-quantize does the same)
    if want == F16:
        return data.astype(np.float16), F16
    return gguf.quants.quantize(data, want), want


# --- hyper-parameters ----------------------------------------------------------------------


def _rope(config) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    params = {**legacy, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def llama3_rope_factors(params: dict, head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of HF's "llama3" rope scaling, as llama.cpp's rope_freqs tensor."""
    base = params["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_hparams(w: gguf.GGUFWriter, model, layout, head_dim: int, notes: list[str]) -> list:
    """Hyper-parameters (scalars for a uniform layout, per-layer arrays for deci); returns
    extra global tensors (rope factors)."""
    cfg = model.config
    hidden = model.get_input_embeddings().weight.shape[1]
    ctx = cfg.max_position_embeddings
    window = getattr(cfg, "sliding_window", None)
    if window and (cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)):
        if window < ctx:
            notes.append(
                f"sliding window {window}: llama.cpp's {layout.arch} graph attends to the whole "
                f"context, so context_length is set to {window} (exact up to it)"
            )
            ctx = window
    per_layer = not layout.uniform
    pick = (lambda xs: list(xs)) if per_layer else (lambda xs: xs[0])
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(len(layout.widths))
    w.add_feed_forward_length(pick([x.ffn for x in layout.widths]))
    w.add_head_count(pick([x.heads for x in layout.widths]))
    w.add_head_count_kv(pick([x.kv_heads for x in layout.widths]))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "llama3" and layout.permute_qk:  # only llama/deci read factors
        return [("rope_freqs.weight", llama3_rope_factors(rope, head_dim))]
    elif rope["rope_type"] != "default":
        raise ValueError(
            f"rope scaling {rope['rope_type']!r} is not exported yet (default, linear, and "
            "llama3 on llama-style graphs are)"
        )
    return []


# --- tensors -------------------------------------------------------------------------------


def _layer_projections(adapter, layer) -> dict:
    out = {}
    for role in GGUF_ROLE:
        linear = adapter.linear(layer, role)
        out[role] = linear.weight
        if linear.bias is not None:
            out[f"{role}.bias"] = linear.bias
    return out


def model_biases(adapter) -> set[str]:
    return {
        role
        for layer in adapter.layers()
        for role in GGUF_ROLE
        if adapter.linear(layer, role).bias is not None
    }


def layer_tensors(adapter, il: int, layer, layout) -> list[tuple[str, torch.Tensor]]:
    """One decoder layer's (GGUF name, tensor) pairs in the layout's order and rows."""
    have = adapter.layer_shape(layer)
    proj = arrange_layer(
        _layer_projections(adapter, layer), have, layout.widths[il], adapter.head_dim, layout
    )
    out = [(f"blk.{il}.attn_norm.weight", layer.input_layernorm.weight)]
    for key, t in proj.items():
        role, _, bias = key.partition(".")
        out.append((f"blk.{il}.{GGUF_ROLE[role]}.{'bias' if bias else 'weight'}", t))
    attn = adapter.attention(layer)
    for part in ("q", "k"):
        norm = getattr(attn, f"{part}_norm", None)
        if norm is not None:
            out.append((f"blk.{il}.attn_{part}_norm.weight", norm.weight))
    out.append((f"blk.{il}.ffn_norm.weight", layer.post_attention_layernorm.weight))
    return out


def global_tensors(model) -> list[tuple[str, torch.Tensor]]:
    out = [("token_embd.weight", model.get_input_embeddings().weight)]
    out.append(("output_norm.weight", get_adapter(model).final_norm().weight))
    if not model.config.tie_word_embeddings:
        out.append(("output.weight", model.get_output_embeddings().weight))
    return out


def has_qk_norm(adapter) -> bool:
    attn = adapter.attention(adapter.layers()[0])
    return getattr(attn, "q_norm", None) is not None


def plan_layout(model):
    adapter = get_adapter(model)
    if not adapter.causal_lm:
        raise ValueError(f"cannot export {adapter.family} to GGUF: not a causal LM")
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":  # every llama.cpp graph used here gates the FFN with SiLU
        raise ValueError(f"cannot export hidden_act={act!r} to GGUF: llama.cpp's graph uses silu")
    widths = [adapter.layer_shape(layer) for layer in adapter.layers()]
    hidden = model.get_input_embeddings().weight.shape[1]
    layout = choose_layout(
        adapter.family, widths, model_biases(adapter), hidden, adapter.head_dim,
        has_qk_norm(adapter),
    )  # fmt: skip
    return adapter, widths, layout


@torch.no_grad()
def write_gguf(model, out: Path, dtype: str, tokenizer=None, tokenizer_gguf=None, name=None):
    """Write `model` to `out` (dtype and out already checked by export_gguf); returns the
    report dict."""
    adapter, widths, layout = plan_layout(model)
    notes = list(layout.notes)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(tmp, layout.arch)
        w.add_name(name or out.stem)
        w.add_file_type(DTYPES[dtype][1])
        extra = write_hparams(w, model, layout, adapter.head_dim, notes)
        if tokenizer_gguf is not None:
            pre = vocab.copy_from_gguf(w, tokenizer_gguf, n_vocab)
        elif tokenizer is not None:
            pre = vocab.write_from_hf(w, tokenizer, n_vocab)
        else:
            raise ValueError("GGUF export needs the model's tokenizer (none was found)")
        written = _write_tensors(w, adapter, model, layout, DTYPES[dtype][0], extra)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _report(out, dtype, layout, widths, written, pre, notes)


def _write_tensors(w, adapter, model, layout, want, extra) -> dict[str, str]:
    pairs = global_tensors(model) + extra
    for il, layer in enumerate(adapter.layers()):
        pairs += layer_tensors(adapter, il, layer, layout)
    written = {}
    # the bar over the encoding: converting and quantising is where the time goes
    for name, t in tqdm(pairs, desc="export gguf", unit="tensor"):
        data, kind = encode(t, want)
        w.add_tensor(name, data, raw_dtype=None if kind in (F32, F16) else kind)
        written[name] = kind.name
    return written


def _report(out, dtype, layout, widths, written, pre, notes) -> dict:
    want = DTYPES[dtype][0].name
    fallback = sorted(n for n, k in written.items() if k not in (want, "F32"))
    if fallback:
        notes.append(
            "to quantise every matrix, prune with --align 32 --no-whole-kv-groups (FFN widths "
            "in whole blocks of 32; docs/serving.md)"
        )
    return {
        "file": str(out),
        "bytes": out.stat().st_size,
        "arch": layout.arch,
        "dtype": dtype,
        "padded": layout.padded,
        "layers": [list(x) for x in widths],
        "written_layers": [list(x) for x in layout.widths],
        "tensor_types": {k: sum(v == k for v in written.values()) for k in set(written.values())},
        "f16_fallback": fallback,
        "tokenizer_pre": pre,
        "notes": notes,
    }
