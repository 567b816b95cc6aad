"""`slimops demo`: the main job on a built-in default, offline.

Prunes the shipped reference model (a small LLaMA-architecture GQA model trained on the
python3-doc corpus by scripts/train_reference_model.py) with SlimGPT, and prints dense vs
pruned perplexity on the corpus' held-out test files, parameters and time. The text is an
excerpt of that corpus shipped in slimops/assets/demo_text, so no setup step is needed.
"""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import torch

REFERENCE_MODEL = Path(__file__).parent / "assets" / "reference_model"
DEMO_TEXT = Path(__file__).parent / "assets" / "demo_text"
CALIB_SAMPLES, CALIB_SEQLEN, EVAL_SEQLEN = 64, 256, 128
# The whole test split is 2,117 windows of 128 tokens: ~3 min per model on a 2-core CPU,
# so the demo scores the first 512 (65k tokens, ~35 s): the shipped test excerpt holds them.
EVAL_WINDOWS, EVAL_BATCH = 512, 32


def demo_data(tokenizer) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(calibration windows, eval ids, description) from the excerpt of the python3-doc
    corpus shipped with slimops (scripts/make_demo_text.py): the same numbers on every
    machine, python3-doc installed or not, in about a minute on 2 CPU cores."""
    from . import calibration

    train, test = (
        calibration.tokenize(_shipped_text(split), tokenizer) for split in ("train", "test")
    )
    calib = calibration.sample_windows(train, CALIB_SAMPLES, CALIB_SEQLEN, seed=0)
    source = f"python3-doc excerpt in {_shown(DEMO_TEXT)} (train -> calibration, test -> ppl)"
    return calib, test, source


def _shipped_text(split: str) -> str:
    return gzip.decompress((DEMO_TEXT / f"{split}.txt.gz").read_bytes()).decode("utf-8")


def _shown(path: Path) -> str:
    """The path relative to the slimops package (the same on every machine)."""
    return f"slimops/{path.relative_to(Path(__file__).parent).as_posix()}"


def run_demo(
    ratio: float = 0.2,
    out: str | None = None,
    device: str = "cpu",
    eval_windows: int = EVAL_WINDOWS,
) -> dict:
    from .checkpoint import save_pruned
    from .evaluation.perplexity import perplexity
    from .pipeline import load_model, prune_model

    torch.manual_seed(0)
    dense, tokenizer = load_model(str(REFERENCE_MODEL))
    calib, test, source = demo_data(tokenizer)
    windows = min(eval_windows or test.numel(), test.numel() // EVAL_SEQLEN)
    print(
        f"reference model: {_shown(REFERENCE_MODEL)}\ndata: {source}; calibration "
        f"{calib.shape[0]} x {calib.shape[1]} tokens; ppl on {windows} windows of "
        f"{EVAL_SEQLEN} tokens ({windows * EVAL_SEQLEN:,} of {test.numel():,} test tokens)"
    )

    def score(model) -> float:
        return perplexity(model.to(device), test, EVAL_SEQLEN, EVAL_BATCH, max_windows=windows)

    dense_ppl = score(dense)
    pruned = copy.deepcopy(dense).to("cpu")
    plan, report = prune_model(pruned, calib, "slimgpt", ratio, "log", device)
    pruned_ppl = score(pruned)
    print(report.summary())
    rows = [
        ("dense", dense_ppl, report.total_params_before, "-"),
        (
            f"slimgpt {ratio:.0%}",
            pruned_ppl,
            report.total_params_after,
            f"{report.wall_seconds:.1f} s",
        ),
    ]
    print(f"\n| model | ppl (seqlen {EVAL_SEQLEN}) | params | prune time |\n|---|---:|---:|---:|")
    for name, ppl, params, t in rows:
        print(f"| {name} | {ppl:.2f} | {params:,} | {t} |")
    print(
        f"\nppl change: {pruned_ppl / dense_ppl - 1:+.1%}; decoder params removed "
        f"{report.achieved_ratio:.1%}"
    )
    if out:
        save_pruned(pruned.to("cpu"), out, tokenizer=tokenizer, plan=plan)
        print(f"saved the pruned model to {out}")
    return {"dense_ppl": dense_ppl, "pruned_ppl": pruned_ppl, "report": report}
