"""Sheared-LLaMA evidence: shear + continued pretraining against its comparisons, at equal
training tokens, on the reference model and the python3-doc domains.

    python benchmarks/bench_sheared.py --split test --out benchmarks/sheared/reference.json

Runs (any subset with --runs):
  sheared-dynamic  pruning stage (--prune-steps) then continued pretraining (--cpt-steps),
                   both with dynamic batch loading
  sheared-static   the same with the uniform static mixture
  slimgpt          slimgpt (one-shot, calibration windows) to the same parameter count, then
                   continued pretraining for prune-steps + cpt-steps (dynamic loading)
  scratch          the target shape randomly initialised, trained prune-steps + cpt-steps
                   (dynamic loading, --scratch-lr)
Every run trains on (prune + cpt steps) x batch x seqlen tokens; slimgpt also reads its
calibration windows. Scored: each domain's mean next-token loss on --split (held-in: the
validation windows the loader evaluates on, for choosing settings; test: the domains'
test-split files, never trained on), averaged over domains; wall time per stage; and the
forward throughput of the final model against the dense one (same run, same batch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from slimops import domains as D
from slimops.methods.sheared.masks import Geometry
from slimops.methods.sheared.method import ShearedConfig, resolve_target
from slimops.models import get_adapter
from slimops.pipeline import load_model, prune_model
from slimops.train import MixtureOptions, shear_and_train
from slimops.trainer import LMObjective, TrainConfig, domain_losses

CORPUS = "/usr/share/doc/python3.11/html/_sources"
RUNS = ("sheared-dynamic", "sheared-static", "slimgpt", "scratch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="slimops/assets/reference_model")
    p.add_argument("--domains", default=CORPUS)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--target", default="hidden=192,heads=4,kv_heads=2,ffn=448")
    p.add_argument("--prune-steps", type=int, default=100)
    p.add_argument("--cpt-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--lr", type=float, default=1e-4, help="continued-pretraining lr")
    p.add_argument("--scratch-lr", type=float, default=2e-3, help="the reference model's own")
    p.add_argument("--shear-options", default="", help="ShearedConfig fields, k=v,...")
    p.add_argument("--split", choices=["held-in", "test"], default="held-in")
    p.add_argument("--test-windows", type=int, default=32, help="per domain (test split)")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def options(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        out[k] = type(getattr(ShearedConfig, k))(v)
    return out


def score(model, doms, args, tokenizer) -> dict:
    """Each domain's mean next-token loss on --split (domains without test text left out)."""
    probe = LMObjective(model).eval()
    held = doms
    if args.split == "test":
        test = D.test_windows(args.domains, tokenizer, args.seqlen, [d.name for d in doms])
        held = [D.Domain(d.name, d.train[:0], test[d.name][: args.test_windows]) for d in doms]
        held = [h for h in held if len(h.valid)]
    losses = domain_losses(probe, held, args.batch_size, "cpu")
    return {
        "per_domain": {d.name: x for d, x in zip(held, losses.tolist())},
        "mean": float(losses.mean()),
    }


@torch.no_grad()
def throughput(models: list, args, rounds: int = 5) -> list[float]:
    """Forward tokens/s of each model (batch x seqlen), the models timed in turns so a
    load on the shared machine hits them alike; the median of `rounds` turns."""
    ids = torch.randint(0, models[0].config.vocab_size, (args.batch_size, args.seqlen))
    times = [[] for _ in models]
    for m in models:
        m.eval()(ids)  # warm-up
    for _ in range(rounds):
        for m, t in zip(models, times):
            tic = time.perf_counter()
            m(ids)
            t.append(time.perf_counter() - tic)
    return [ids.numel() / sorted(t)[len(t) // 2] for t in times]


def scratch_model(source, target):
    from transformers import AutoModelForCausalLM

    cfg = source.config.to_dict() | {
        "hidden_size": target.hidden,
        "num_hidden_layers": target.layers,
        "num_attention_heads": target.heads,
        "num_key_value_heads": target.kv_heads,
        "intermediate_size": target.ffn,
    }
    config = type(source.config).from_dict(cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def run_one(name, args, doms, reference, shear_cfg, target):
    model, tokenizer = load_model(args.model)
    total = args.prune_steps + args.cpt_steps

    def training(steps: int, lr: float) -> TrainConfig:  # 10% warm-up, shared evaluation
        return TrainConfig(
            steps, args.batch_size, lr, max(1, steps // 10), eval_interval=args.eval_interval
        )

    cpt = training(args.cpt_steps, args.lr)
    mix = MixtureOptions(dynamic=name != "sheared-static", reference=reference)
    info, tic = {}, time.perf_counter()
    if name.startswith("sheared"):
        model, _, log = shear_and_train(model, doms, shear_cfg, cpt, mix)
        info["prune_wall_s"] = log["shear_wall_s"]
    else:
        cpt = training(total, args.lr)
        if name == "slimgpt":
            geo = Geometry.of(get_adapter(model))
            ratio = 1 - geo.size(target) / geo.size(geo.shape)
            calib = torch.cat([d.train for d in doms])
            pick = torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))[:128]
            t0 = time.perf_counter()
            prune_model(model, calib[pick], "slimgpt", ratio)
            info["prune_wall_s"] = time.perf_counter() - t0
        else:
            model = scratch_model(model, target)
            cpt = training(total, args.scratch_lr)
        model, _, log = shear_and_train(model, doms, None, cpt, mix)
    info["cpt_wall_s"] = log["cpt_wall_s"]
    info["wall_s"] = time.perf_counter() - tic
    info["decoder_params"] = get_adapter(model).decoder_params()
    dense, _ = load_model(args.model)
    info["dense_tokens_per_s"], info["tokens_per_s"] = throughput([dense, model], args)
    info["score"] = score(model, doms, args, tokenizer)
    info["final_weights"] = log["cpt"]["mixture"][-1]["weights"]
    first = log["cpt"]["mixture"][0]["losses"]  # held-in, right after pruning and slicing
    info["after_prune_held_in"] = sum(first) / len(first)
    return info


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    source, tokenizer = load_model(args.model)
    doms = D.load_domains(args.domains, tokenizer, args.seqlen)
    reference = domain_losses(LMObjective(source).eval(), doms, args.batch_size, "cpu")
    shear_cfg = ShearedConfig(
        target=args.target,
        prune_steps=args.prune_steps,
        batch_size=args.batch_size,
        **options(args.shear_options),
    )
    target = resolve_target(shear_cfg, Geometry.of(get_adapter(source)))
    result = {
        "args": vars(args),
        "domains": [d.name for d in doms],
        "target": vars(target),
        "dense": {
            "decoder_params": get_adapter(source).decoder_params(),
            "score": score(source, doms, args, tokenizer),
        },
        "runs": {},
    }
    for name in args.runs.split(","):
        print(f"=== {name}", file=sys.stderr, flush=True)
        result["runs"][name] = run_one(name, args, doms, reference, shear_cfg, target)
        r = result["runs"][name]
        print(
            f"{name}: mean loss {r['score']['mean']:.4f}, {r['wall_s']:.0f} s, "
            f"{r['tokens_per_s']:.0f} tok/s",
            flush=True,
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print()
    print(domain_table(result))


def domain_table(result: dict) -> str:
    """Per-domain loss of every run (columns) on the scored split."""
    runs = {"dense": result["dense"], **result["runs"]}
    head = "| domain | " + " | ".join(runs) + " |"
    rows = [head, "|---|" + "---:|" * len(runs)]
    for name in result["dense"]["score"]["per_domain"]:
        cells = " | ".join(f"{r['score']['per_domain'][name]:.3f}" for r in runs.values())
        rows.append(f"| {name} | {cells} |")
    return "\n".join(rows)


def table(result: dict) -> str:
    """One row per run: parameters, mean loss, wall time per stage, throughput vs dense
    (timed in turns within the run)."""
    dense = result["dense"]
    rows = [
        "| run | decoder params | mean loss | wall s (prune / train) | tok/s (x dense) |",
        "|---|---:|---:|---:|---:|",
        f"| dense | {dense['decoder_params']:,} | {dense['score']['mean']:.4f} | - | - |",
    ]
    for name, r in result["runs"].items():
        rows.append(
            f"| {name} | {r['decoder_params']:,} | {r['score']['mean']:.4f} | {r['wall_s']:.0f} "
            f"({r.get('prune_wall_s', 0):.0f} / {r['cpt_wall_s']:.0f}) | {r['tokens_per_s']:.0f} "
            f"({r['tokens_per_s'] / r['dense_tokens_per_s']:.2f}x) |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
