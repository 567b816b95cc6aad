"""Reformation of one search winner, compared: OBS closed form vs the paper's ADMM vs none.

    python benchmarks/bench_reformation.py --ratios 0.3 0.5 --held-in --json out.json

Runs search once per ratio with reformation="none" (the winner's plan, nothing refit), then
applies each reformation to a fresh copy of the dense model with that same plan, slices it
and scores perplexity, so the three differ only in how the kept weights are rebuilt.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

from bench_quality import Scorer, calibration_windows, split_text

from common import add_args, write_json
from slimops import slicing
from slimops.methods import make_config
from slimops.methods.search import method as search
from slimops.methods.search.reformation import reform
from slimops.models import get_adapter
from slimops.pipeline import load_model

HOW = ("obs", "admm", "none")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="slimops/assets/reference_model")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--seqlens", type=int, nargs="+", default=[128])
    p.add_argument("--held-in", action="store_true", help="score the last 10%% of train text")
    add_args(p, data="python3-doc", nsamples=64, calib_seqlen=256, eval_tokens=65536)
    add_args(p, eval_batch=16, sentences=512, seed=0, device="cpu", json=None)
    args = p.parse_args(argv)
    dense, tokenizer = load_model(args.model)
    train, test = split_text(args.data, args.held_in)
    tokens = calibration_windows(dense, tokenizer, train, args)
    scorer = Scorer(dense, tokenizer, test, args)
    rows = [{"ratio": 0.0, "how": "dense", **scorer(dense)}]
    for ratio in args.ratios:
        cfg = make_config("search", ratio, None, args.device, reformation="none")
        winner = copy.deepcopy(dense)
        plan = search.prune(winner, tokens, cfg)
        for how in HOW:
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            if how != "none":
                reform(model, get_adapter(model), tokens, plan, how, **cfg.driver())
            seconds = time.perf_counter() - start
            slicing.apply_plan(model, plan)
            rows.append({"ratio": ratio, "how": how, "seconds": seconds, **scorer(model)})
            print(rows[-1], file=sys.stderr)
    keys = [k for k in rows[0] if k.startswith(("ppl", "cosine"))]
    print("| ratio | reformation | " + " | ".join(keys) + " | seconds |")
    print("|---|---|" + "---:|" * (len(keys) + 1))
    for r in rows:
        cells = " | ".join(f"{r[k]:.2f}" for k in keys)
        print(f"| {r['ratio']:.0%} | {r['how']} | {cells} | {r.get('seconds', 0):.1f} |")
    if args.json:
        write_json(args.json, {"rows": rows, "argv": sys.argv[1:]})
    return rows


if __name__ == "__main__":
    main()
