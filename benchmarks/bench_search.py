"""Candidates per second of search's fitness: virtual layers (slice_gemm on the dense weights)
with prefix reuse, the same without the prefix cache, and the baseline of materialising each
candidate as a pruned copy (deepcopy + slicing.apply_plan), all in one run on one list of
candidates bred as a search breeds them (mutations of the salient seed and of each other).

    python benchmarks/bench_search.py --model slimops/assets/reference_model --candidates 48

Every path must give the same fitness (checked): only the time differs.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time

import torch
import torch.nn.functional as F

from common import add_args, device_string, write_json
from slimops import calibration, corpus
from slimops.methods.saliency import dense_pass
from slimops.methods.search import method as search
from slimops.methods.search.fitness import Evaluator
from slimops.methods.search.space import Space
from slimops.models import get_adapter
from slimops.pipeline import load_model
from slimops.plan import PruningPlan
from slimops.slicing import apply_plan


def candidates(space: Space, n: int, seed: int) -> list:
    """n distinct in-budget candidates: a population, then children of random members."""
    rng = random.Random(seed)
    cfg = search.SearchConfig(
        ratio=space.ratio, population=min(8, n), mutations=4, crossovers=2, parents=4
    )
    pop, _ = search.initial_population(space, cfg, rng)
    while len(pop) < n:
        child = search.mutant(space, rng.choice(pop), cfg, rng)
        if child not in pop:
            pop.append(child)
    return pop[:n]


@torch.no_grad()
def materialised_ppl(model, cand, tokens, batch_size) -> float:
    pruned = apply_plan(copy.deepcopy(model), PruningPlan([g.plan() for g in cand]))
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        ids = tokens[i : i + batch_size]
        out = pruned(ids, use_cache=False).logits
        total += float(
            F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        )
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def timed(fn, cands) -> tuple[float, list[float]]:
    start = time.perf_counter()
    values = [fn(c) for c in cands]
    return time.perf_counter() - start, values


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="slimops/assets/reference_model")
    add_args(p, ratio=0.3, candidates=48, fitness_samples=8, seqlen=256, batch_size=8, seed=0)
    add_args(p, json=(None, "write the result here"))
    args = p.parse_args(argv)

    model, tok = load_model(args.model)
    ids = calibration.tokenize(corpus.read_split("train"), tok)
    tokens = calibration.sample_windows(ids, args.fitness_samples, args.seqlen, args.seed)
    adapter = get_adapter(model)
    stats, _ = dense_pass(model, adapter, tokens, 0.01, args.seqlen)
    space = Space([s.space for s in stats], 0, "params", args.ratio)
    cands = candidates(space, args.candidates, args.seed)
    rows = {}
    for name, cache_mb in (("slice_gemm + prefix reuse", 1024), ("slice_gemm, no reuse", 0)):
        ev = Evaluator(model, adapter, tokens, "ppl", "cpu", args.batch_size, cache_mb=cache_mb)
        rows[name] = timed(ev, cands)
    rows["materialised copies"] = timed(
        lambda c: materialised_ppl(model, c, tokens, args.batch_size), cands
    )
    base = rows["materialised copies"][1]
    for name, (_, values) in rows.items():
        worst = max(abs(a / b - 1) for a, b in zip(values, base))
        assert worst < 1e-3, f"{name}: fitness differs from the materialised copy by {worst:.1e}"
    base_s = rows["materialised copies"][0]
    print(
        f"device: {device_string()}\nmodel {args.model}, {len(cands)} candidates at "
        f"{args.ratio:.0%}, fitness on {tuple(tokens.shape)} tokens\n"
    )
    print("| path | seconds | candidates/s | vs materialised |\n|---|---:|---:|---:|")
    result = {
        "model": args.model,
        "candidates": len(cands),
        "tokens": list(tokens.shape),
        "device": device_string(),
        "rows": {},
    }
    for name, (secs, _) in rows.items():
        result["rows"][name] = {
            "seconds": secs,
            "candidates_per_second": len(cands) / secs,
            "speedup": base_s / secs,
        }
        print(f"| {name} | {secs:.2f} | {len(cands) / secs:.2f} | {base_s / secs:.2f}x |")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
