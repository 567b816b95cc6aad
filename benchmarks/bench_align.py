"""Does `--align N` make pruned models faster? FFN GEMMs by width, then whole models.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_align.py --json align.json
    python benchmarks/bench_align.py --device cuda --dtype bf16        # on a GPU

1. micro: the three FFN matmuls of one layer (gate, up: T x hidden -> T x w; down:
   T x w -> T x hidden, torch.nn.functional.linear) for widths w in [--wmin, --wmax]: every
   multiple of 8 with w+1 (odd) and w+4 (a multiple of 4 only) timed right after it, or
   every width with --step 1. Decode (T=1, caches flushed between calls: a decoding model
   reads its weights from DRAM) and prefill (T = --prefill). Rounds visit the triples in
   shuffled order. Table: the median per width over a fit t = a + b*w, by alignment class
   (largest power of two dividing w, capped at 128). Same-run ratio: per-channel time of
   w+1 (w+4) over w, paired within a round, median over triples and rounds: a shared
   machine's load changes between rounds, not within a triple.
2. end to end: a LLaMA-shaped random model (std 0.02 init) pruned by --ratio with
   slimgpt unaligned and aligned to each N in --aligns, calibrated on random ids; batch-1
   prefill of --prompt tokens and greedy decode of --new tokens (KV cache), and a prefill
   of --long-prompt tokens; medians of --repeats round-robin repeats, ratios against dense.
3. accuracy (--ppl, opt-in, ~2 min): the shipped reference model (slimops demo) pruned
   unaligned and aligned, perplexity on the corpus' test windows: what alignment costs.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F

from common import DTYPES, SHAPE, add_args, build_config, write_json


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    add_args(p, **SHAPE, threads=2, wmin=1600, wmax=2000)
    add_args(p, step=(0, "1: every width (default: the grid)"), micro_repeats=5)
    p.add_argument("--prefill", type=int, nargs="*", default=[128, 512])
    add_args(p, ratio=0.3, schedule="log")
    p.add_argument("--aligns", default="8,64", help="comma-separated N for the aligned runs")
    p.add_argument(
        "--ffn-only-aligns",
        default="8",
        help="N for runs that align the FFN only (whole_kv_groups=False)",
    )
    add_args(p, nsamples=16, seqlen=128, prompt=128, new=64, repeats=5)
    add_args(p, long_prompt=(512, "0: skip the long prefill"), ppl_windows=256)
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--ppl", action="store_true", help="also part 3 (accuracy)")
    add_args(p, json=(None, "write every number here"))
    return p.parse_args()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_string(args) -> str:
    if torch.device(args.device).type == "cuda":
        return torch.cuda.get_device_name(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus, "
        f"{torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"load {load:.2f}{' (NOISY: machine busy)' if load >= 1.5 else ''}"
    )


def alignment(w: int) -> int:
    """The largest power of two dividing w, capped at 128."""
    a = 1
    while w % (2 * a) == 0 and a < 128:
        a *= 2
    return a


# ---- 1. micro: FFN matmuls by width ----------------------------------------------------


def width_groups(args) -> list[tuple[int, ...]]:
    """(w, w+1, w+4) for every multiple of 8 in range (each triple is timed back to back,
    so its ratios share the machine's state), or single widths with --step."""
    if args.step:
        return [(w,) for w in range(args.wmin, args.wmax + 1, args.step)]
    grid = range(args.wmin + (-args.wmin) % 8, args.wmax + 1, 8)
    return [(w, w + 1, w + 4) for w in grid]


def time_ffn(groups, T, args, flush) -> dict[int, list[float]]:
    """Seconds of gate + up + down per width, one sample per round; groups in shuffled
    order each round, widths inside a group in shuffled order, back to back."""
    dev, dt, d = args.device, DTYPES[args.dtype], args.hidden
    wmax = max(max(gr) for gr in groups)
    g = torch.Generator().manual_seed(0)
    base_in = (torch.randn(wmax, d, generator=g) * 0.02).to(dev, dt)  # gate/up rows
    base_out = (torch.randn(d, wmax, generator=g) * 0.02).to(dev, dt)  # down
    X = torch.randn(T, d, generator=g).to(dev, dt)
    scratch = torch.empty(64 * 2**20 // 4, device=dev) if flush else None
    samples = {w: [] for gr in groups for w in gr}
    for rep in range(args.micro_repeats + 1):  # the first round is warm-up
        rng = random.Random(rep)
        for gr in rng.sample(groups, len(groups)):
            for w in rng.sample(gr, len(gr)):
                gate, up = base_in[:w].clone(), base_in[-w:].clone()
                down = base_out[:, :w].contiguous()
                if flush:
                    scratch.add_(1.0)  # evict the weights from cache
                sync(dev)
                t0 = time.perf_counter()
                h = F.silu(F.linear(X, gate)) * F.linear(X, up)
                F.linear(h, down)
                sync(dev)
                if rep:
                    samples[w].append(time.perf_counter() - t0)
    return samples


def fit_line(times: dict[int, float]) -> tuple[float, float]:
    xs, ys = list(times), list(times.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def paired(groups, samples, k: int, base_align: int = 8) -> float:
    """Median over groups and rounds of t(w+k) / t(w) * w / (w+k): the per-channel cost of
    a width k past an aligned one, relative to it (>1: the aligned width is faster)."""
    r = [
        samples[gr[0] + k][i] / samples[gr[0]][i] * gr[0] / (gr[0] + k)
        for gr in groups
        if len(gr) > 1 and alignment(gr[0]) >= base_align
        for i in range(len(samples[gr[0]]))
    ]
    return statistics.median(r) if r else float("nan")


def micro(args) -> list[dict]:
    groups = width_groups(args)
    ws = sorted(w for gr in groups for w in gr)
    rows = []
    for T in [1] + list(args.prefill):
        samples = time_ffn(groups, T, args, flush=(T == 1 and args.device == "cpu"))
        times = {w: statistics.median(samples[w]) for w in ws}
        a, b = fit_line(times)
        classes = {}
        for w, t in times.items():
            classes.setdefault(alignment(w), []).append(t / (a + b * w))
        mid = min(times, key=lambda w: abs(w - (args.wmin + args.wmax) / 2))
        flops = 3 * 2 * T * args.hidden * mid
        nbytes = 3 * args.hidden * mid * torch.finfo(DTYPES[args.dtype]).bits // 8
        print(
            f"\n### FFN gate+up+down, T={T} ({'decode' if T == 1 else 'prefill'}), "
            f"hidden {args.hidden}, {len(ws)} widths {min(ws)}..{max(ws)}, "
            f"median of {args.micro_repeats}"
        )
        print(
            f"w={mid}: {times[mid] * 1e3:.3f} ms, {flops / times[mid] / 1e9:.1f} GFLOP/s, "
            f"weights {nbytes / times[mid] / 1e9:.1f} GB/s; fit {a * 1e3:.3f} ms + "
            f"{b * 1e6:.3f} us/channel"
        )
        print(
            "| w divisible by (max) | widths | time / fit (median) | spread | "
            "us per channel (median) |\n|---:|---:|---:|---:|---:|"
        )
        for c in sorted(classes):
            r = classes[c]
            per_ch = statistics.median(times[w] / w for w in ws if alignment(w) == c)
            print(
                f"| {c} | {len(r)} | {statistics.median(r):.4f} | {min(r):.3f}..{max(r):.3f} "
                f"| {per_ch * 1e6:.4f} |"
            )
        ratios = {
            f"w+{k} / w, w multiple of {n}": paired(groups, samples, k, n)
            for k in (1, 4)
            for n in (8, 64)
        }
        if not args.step:
            print(
                "same-run paired ratio, per channel (>1: the aligned width w is faster): "
                + "; ".join(f"{name} = {v:.4f}" for name, v in ratios.items())
            )
        rows.append(
            {
                "T": T,
                "samples": {str(w): samples[w] for w in ws},
                "fit": [a, b],
                "paired": ratios,
                "class_time_over_fit": {str(c): statistics.median(r) for c, r in classes.items()},
            }
        )
    return rows


# ---- 2. end to end ----------------------------------------------------------------------


def variants(args) -> list[tuple[str, dict]]:
    """(label, prune options): unaligned, --align N, and FFN-only alignment."""
    out = [("unaligned", {})]
    out += [(f"align {n}", {"align": int(n)}) for n in args.aligns.split(",") if n]
    out += [
        (f"align {n} FFN only", {"align": int(n), "whole_kv_groups": False})
        for n in args.ffn_only_aligns.split(",")
        if n
    ]
    return out


def build_model(args):
    from transformers import LlamaForCausalLM

    cfg = build_config(args, max_position_embeddings=max(args.seqlen, args.prompt + args.new))
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@torch.inference_mode()
def prefill_and_decode(model, prompt, new: int, device, long_prompt=None):
    """(prefill seconds, seconds per decoded token, long prefill seconds or nan), greedy,
    batch 1, KV cache."""
    from transformers import DynamicCache

    long_s = float("nan")
    if long_prompt is not None:
        sync(device)
        t0 = time.perf_counter()
        model(input_ids=long_prompt, use_cache=False)
        sync(device)
        long_s = time.perf_counter() - t0
    cache = DynamicCache()
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    sync(device)
    t1 = time.perf_counter()
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(new):
        out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    sync(device)
    return t1 - t0, (time.perf_counter() - t1) / new, long_s


def end_to_end(args) -> dict:
    from slimops.pipeline import prune_model

    dense = build_model(args)
    calib = torch.randint(
        0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(1)
    )
    held = torch.randint(
        0, args.vocab, (4, args.seqlen), generator=torch.Generator().manual_seed(2)
    )
    models, info = {"dense": dense}, {}
    for name, opts in variants(args):
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        plan, report = prune_model(m, calib, "slimgpt", args.ratio, args.schedule, **opts)
        shapes = [tuple(s.values()) for s in plan.shapes()]
        info[name] = {
            "achieved_ratio": report.achieved_ratio,
            "shapes": shapes,
            "distinct_shapes": len(set(shapes)),
            "prune_seconds": time.perf_counter() - t0,
        }
        models[name] = m
    dev_models = {k: m.to(args.device, DTYPES[args.dtype]) for k, m in models.items()}
    with torch.inference_mode():  # accuracy proxy on held-out random ids
        ref = dev_models["dense"](held.to(args.device)).logits.float()
        for name, m in dev_models.items():
            if name != "dense":
                diff = m(held.to(args.device)).logits.float() - ref
                info[name]["rel_logit_error"] = float(diff.norm() / (ref - ref.mean()).norm())
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g).to(args.device)
    long_prompt = (
        torch.randint(0, args.vocab, (1, args.long_prompt), generator=g).to(args.device)
        if args.long_prompt
        else None
    )
    samples = {k: ([], [], []) for k in dev_models}
    for rep in range(args.repeats + 1):  # round-robin; first round is warm-up
        for name in random.Random(rep).sample(list(dev_models), len(dev_models)):
            times = prefill_and_decode(dev_models[name], prompt, args.new, args.device, long_prompt)
            if rep:
                for sink, t in zip(samples[name], times):
                    sink.append(t)
    base = {k: statistics.median(v) for k, v in zip(("pre", "dec", "long"), samples["dense"])}
    print(
        f"\n### end to end: LLaMA-shaped, hidden {args.hidden}, FFN {args.ffn}, "
        f"{args.heads}q/{args.kv_heads}kv, {args.layers} layers; slimgpt {args.ratio:.0%} "
        f"{args.schedule}; batch 1, prompt {args.prompt}, {args.new} new tokens, "
        f"median of {args.repeats}"
    )
    print(
        f"| model | removed | FFN widths | heads (q/kv) | distinct shapes | rel. logit err | "
        f"prefill {args.prompt} ms | vs dense | decode ms/tok | vs dense | "
        f"prefill {args.long_prompt} ms | vs dense |\n"
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name in dev_models:
        pre, dec, long_s = (statistics.median(x) for x in samples[name])
        i = info.setdefault(name, {})
        i.update(
            prefill_s=pre,
            decode_s_per_token=dec,
            long_prefill_s=long_s,
            prefill_speedup=base["pre"] / pre,
            decode_speedup=base["dec"] / dec,
            long_prefill_speedup=base["long"] / long_s,
            samples=dict(zip(("prefill", "decode", "long_prefill"), samples[name])),
        )
        sh = i.get("shapes") or [(args.heads, args.kv_heads, args.ffn)] * args.layers
        print(
            f"| {name} | {i.get('achieved_ratio', 0.0):.2%} | "
            f"{','.join(str(s[2]) for s in sh)} | "
            f"{','.join(f'{s[0]}/{s[1]}' for s in sh)} | {len(set(sh))} | "
            f"{i.get('rel_logit_error', 0.0):.4f} | {pre * 1e3:.1f} | "
            f"{base['pre'] / pre:.3f}x | {dec * 1e3:.2f} | {base['dec'] / dec:.3f}x | "
            f"{long_s * 1e3:.1f} | {base['long'] / long_s:.3f}x |"
        )
    return info


def accuracy(args) -> dict:
    """Perplexity of the shipped reference model, dense and pruned with/without --align."""
    from slimops.demo import EVAL_SEQLEN, REFERENCE_MODEL, demo_data
    from slimops.evaluation.perplexity import perplexity
    from slimops.pipeline import load_model, prune_model

    torch.manual_seed(0)
    dense, tokenizer = load_model(str(REFERENCE_MODEL))
    calib, test, source = demo_data(dense, tokenizer)

    def score(model):
        return perplexity(model, test, EVAL_SEQLEN, 32, max_windows=args.ppl_windows)

    rows = {"dense": {"ppl": score(dense)}}
    for ratio in (0.2, 0.3):
        for name, opts in variants(args):
            m = copy.deepcopy(dense)
            plan, report = prune_model(m, calib, "slimgpt", ratio, "log", **opts)
            rows[f"{ratio:.0%} {name}"] = {
                "ppl": score(m),
                "achieved_ratio": report.achieved_ratio,
                "shapes": [tuple(s.values()) for s in plan.shapes()],
            }
    print(
        f"\n### accuracy: reference model ({REFERENCE_MODEL.name}), slimgpt log, "
        f"{source}; ppl on {args.ppl_windows} windows of {EVAL_SEQLEN}\n"
        "| model | removed | ppl | vs dense | shapes (q/kv/FFN) |\n|---|---:|---:|---:|---|"
    )
    for name, r in rows.items():
        shapes = " ".join("/".join(map(str, s)) for s in r.get("shapes", []))
        print(
            f"| {name} | {r.get('achieved_ratio', 0.0):.2%} | {r['ppl']:.3f} | "
            f"{r['ppl'] / rows['dense']['ppl']:.3f}x | {shapes} |"
        )
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"device: {device_string(args)}; torch {torch.__version__}; dtype {args.dtype}")
    result = {"args": vars(args), "device": device_string(args)}
    if not args.skip_micro:
        result["micro"] = micro(args)
    if not args.skip_e2e:
        result["end_to_end"] = end_to_end(args)
    if args.ppl:
        result["accuracy"] = accuracy(args)
    result["device_after"] = device_string(args)
    print(f"\ndevice after: {result['device_after']}; wall {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
