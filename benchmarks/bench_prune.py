"""End-to-end SlimGPT timing: the fast path (slimops ops: SYRK Hessians, batched Cholesky
scoring, rank-s downdates) vs the paper-faithful reference (torch addmm Hessians, inverse
recomputed every step, groups scored one at a time), same model, same calibration, same run.

    python benchmarks/bench_prune.py --layers 8 --hidden 1024 --ffn 2816 --heads 16 \\
        --kv-heads 16 --nsamples 32 --seqlen 256 --device cpu

Prints per-phase seconds (forward, hessian, obs = scoring + OBS updates, slicing) for both
paths, checks that both keep the same heads and channels, and ends with
"math speedup <x> total speedup <y>" (math = hessian + obs: what the kernels replace).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import SHAPE, add_args, build_config, markdown_table, write_json


def build_model(args):
    from transformers import LlamaForCausalLM

    cfg = build_config(args, max_position_embeddings=args.seqlen)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg).to(getattr(torch, args.dtype)).eval()


def run(model, tokens, args, reference: bool):
    from slimops.methods.slimgpt import method as slimgpt
    from slimops.slicing import apply_plan

    cfg = slimgpt.SlimGPTConfig(
        ratio=args.ratio,
        schedule=args.schedule,
        device=args.device,
        batch_size=args.batch_size,
        reference=reference,
    )
    start = time.perf_counter()
    plan = slimgpt.prune(model, tokens, cfg)
    t0 = time.perf_counter()
    apply_plan(model, plan)
    phases = dict(plan.info["phase_seconds"], slicing=time.perf_counter() - t0)
    phases["total"] = time.perf_counter() - start
    phases["math"] = phases.get("hessian", 0.0) + phases.get("obs", 0.0)
    return plan, phases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(p, **(SHAPE | {"kv_heads": (None, "default: = --heads (MHA)")}))
    add_args(p, nsamples=32, seqlen=256, batch_size=8, ratio=0.2, schedule="log")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_args(p, seed=0, json=(None, "write both paths' phase times here"))
    args = p.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    from slimops import ops

    dense = build_model(args)
    tokens = torch.randint(
        0,
        args.vocab,
        (args.nsamples, args.seqlen),
        generator=torch.Generator().manual_seed(args.seed),
    )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"device: {device}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"backends {ops.backends()}"
    )
    plan_f, fast = run(copy.deepcopy(dense), tokens, args, reference=False)
    plan_r, ref = run(copy.deepcopy(dense), tokens, args, reference=True)
    same = plan_f.layers == plan_r.layers
    rows = [
        {"phase": phase, "fast": fast.get(phase, 0.0), "reference": ref.get(phase, 0.0)}
        for phase in ("forward", "hessian", "obs", "slicing", "math", "total")
    ]
    for row in rows:
        row["speedup"] = row["reference"] / row["fast"] if row["fast"] else float("nan")
    columns = [
        ("phase", "phase", "{}"),
        ("fast", "fast (s)", "{:.2f}"),
        ("reference", "reference (s)", "{:.2f}"),
        ("speedup", "speedup", "{:.2f}x"),
    ]
    print("\n" + markdown_table(rows, columns))
    print(f"\nsame heads and channels selected: {same}")
    if args.json:
        write_json(
            args.json,
            {
                "args": vars(args),
                "device": device,
                "fast": fast,
                "reference": ref,
                "same_selection": same,
            },
        )
    print(
        f"math speedup {ref['math'] / fast['math']:.2f} total speedup "
        f"{ref['total'] / fast['total']:.2f}"
    )


if __name__ == "__main__":
    main()
