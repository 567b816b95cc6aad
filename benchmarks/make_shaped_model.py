"""Build a LLaMA-shaped model with random weights as a HF folder, for throughput work
where only the shapes matter (prune it, then `slimops bench dense pruned`).

    python benchmarks/make_shaped_model.py --out /tmp/llama-1024             # CPU default
    python benchmarks/make_shaped_model.py --preset llama-7b --out /tmp/l7b  # GPU, bf16

Defaults: hidden 1024, FFN 2816, 16 query / 4 KV heads, 8 layers, vocab 4096, fp32 (the
shape of the throughput table in docs/results.md). The tokenizer is the reference model's
(slimops/assets/reference_model, 4096 ids), so a larger --vocab just has embedding rows no
text reaches.
Weights are HF's init with std 0.02 (initializer_range), which keeps activations finite
through 32 layers, drawn directly in --dtype: a 7B bf16 model is ~13.5 GB in memory once,
never an fp32 copy (27 GB) first. Explicit options override a preset.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from common import DTYPES, SHAPE, add_args, build_config

REFERENCE = Path(__file__).resolve().parent.parent / "slimops" / "assets" / "reference_model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_VOCAB, TOKEN_ID = 4096, 0  # its size; <|endoftext|> is bos = eos = pad = 0
TOKEN_IDS = dict(bos_token_id=TOKEN_ID, eos_token_id=TOKEN_ID, pad_token_id=TOKEN_ID)
DEFAULTS = {**SHAPE, "dtype": "fp32", "max_positions": 4096}
PRESETS = {
    "llama-7b": dict(
        hidden=4096, ffn=11008, heads=32, kv_heads=32, layers=32, vocab=32000, dtype="bf16"
    )
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    add_args(p, **dict.fromkeys(SHAPE))  # None: from --preset or DEFAULTS
    p.add_argument("--max-positions", type=int, help="max_position_embeddings")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument(
        "--device",
        default="cpu",
        help="where to draw the weights (cuda is faster for 7B); they are saved from there",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    chosen = {**DEFAULTS, **PRESETS.get(args.preset, {})}
    for key, value in chosen.items():  # explicit options beat the preset
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args) -> None:
    """One clear ValueError for shapes a LLaMA config or the tokenizer cannot take."""
    if min(args.hidden, args.ffn, args.heads, args.kv_heads, args.layers) < 1:
        raise ValueError("--hidden, --ffn, --heads, --kv-heads and --layers must be positive")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.vocab < TOKENIZER_VOCAB:
        raise ValueError(
            f"--vocab {args.vocab} < {TOKENIZER_VOCAB}: the reference tokenizer "
            "would emit ids past the embedding"
        )
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (use --overwrite)")


def build_model(args):
    """Random-init LlamaForCausalLM, parameters created and initialised in args.dtype."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(args.device):
        config = build_config(args, max_position_embeddings=args.max_positions, **TOKEN_IDS)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype])
    return model.eval()


def save(model, out: Path, overwrite: bool) -> Path:
    if out.exists() and overwrite:
        shutil.rmtree(out)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(REFERENCE / name, out / name)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
    except (ValueError, FileExistsError) as err:
        print(f"make_shaped_model: error: {err}", file=sys.stderr)
        return 2
    model = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    out = save(model, Path(args.out), args.overwrite)
    shape = {k: getattr(args, k) for k in (*SHAPE, "dtype")}
    print(f"wrote {out}: {params:,} params, {json.dumps(shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
