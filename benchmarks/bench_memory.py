"""Peak host memory of `slimops prune --stream` on stacks shaped like large models.

    python benchmarks/bench_memory.py --shape 70b --shape 7b --json benchmarks/memory.json

For each shape a random bf16 model with only `--layers` decoder layers is written to disk
(the point is per-layer memory, not depth), then pruned by `slimops prune --stream` in a
child process whose peak RSS (VmHWM) is read when it exits. The table sets that peak beside
the model's size, one layer's size, the calibration activations and the target of the issue:
at most 2 layers + activations + 1 GB. It also shows what no layer-streaming prune can avoid
holding: the OBS state of the widest projection (down_proj's H and its inverse, fp32).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import add_args, write_json

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, ffn, query heads, kv heads
    "70b": (8192, 28672, 64, 8),
    "7b": (4096, 11008, 32, 32),
}
GB = 2**30


def layer_bytes(hidden: int, ffn: int, heads: int, kv: int, elem: int = 2) -> int:
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv * head_dim
    return (attn + 3 * hidden * ffn + 2 * hidden) * elem


def build(folder: Path, shape: str, layers: int, vocab: int) -> None:
    hidden, ffn, heads, kv = SHAPES[shape]
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "make_shaped_model.py"),
        "--hidden",
        str(hidden),
        "--ffn",
        str(ffn),
        "--heads",
        str(heads),
        "--kv-heads",
        str(kv),
        "--layers",
        str(layers),
        "--vocab",
        str(vocab),
        "--dtype",
        "bf16",
        "--out",
        str(folder),
    ]
    subprocess.run(cmd, check=True, capture_output=True)


def prune_child(folder: Path, out: Path, text: Path, args) -> tuple[dict, float]:
    """(the prune report, the child's peak RSS in GB)."""
    report = out.with_suffix(".json")
    cmd = [
        sys.executable,
        "-m",
        "slimops.cli",
        "prune",
        str(folder),
        "--stream",
        "--ratio",
        str(args.ratio),
        "--schedule",
        "uniform",
        "--split",
        args.split,
        "--calib",
        str(text),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--dtype",
        "bf16",
        "--out",
        str(out),
        "--json",
        str(report),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, capture_output=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:  # an earlier, larger child holds the maximum: use the report's
        peak_kb = json.loads(report.read_text())["peak_memory_mb"] * 1024
    return json.loads(report.read_text()), peak_kb / 2**20


def measure(shape: str, args, tmp: Path, text: Path) -> dict:
    hidden, ffn, heads, kv = SHAPES[shape]
    folder, out = tmp / f"{shape}-dense", tmp / f"{shape}-pruned"
    build(folder, shape, args.layers, args.vocab)
    report, peak = prune_child(folder, out, text, args)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GB
    layer = layer_bytes(hidden, ffn, heads, kv) / GB
    acts = args.nsamples * args.seqlen * hidden * 2 / GB  # bf16 hidden states
    obs = 2 * ffn * ffn * 4 / GB  # down_proj's H and Hinv, fp32
    target = 2 * layer + acts + 1
    return {
        "shape": shape,
        "split": args.split,
        "layers": args.layers,
        "model_gb": size,
        "layer_gb": layer,
        "activations_gb": acts,
        "obs_state_gb": obs,
        "peak_rss_gb": peak,
        "target_gb": target,
        "met": peak <= target,
        "wall_s": report["wall_seconds"],
        "achieved_ratio": report["achieved_ratio"],
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES))
    add_args(p, layers=2, vocab=32000, ratio=0.2, nsamples=8, seqlen=128)
    # equal: split=obs (slimgpt's default) also holds down_proj's H while the heads go and
    # walks a 32-point FFN error curve: an estimated ~8 CPU-minutes per layer at the 70B
    # shape (32 rank-896 downdates of a 28672^2 inverse; not measured).
    add_args(p, split=("equal", "slimgpt --split for the prune (obs: the default's memory)"))
    p.add_argument("--workdir", help="where the models go (default: a temp folder)")
    add_args(p, json=None)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        text = tmp / "calib.txt"
        text.write_text((ROOT / "README.md").read_text() * 20)
        for shape in args.shape or ["7b"]:
            rows.append(measure(shape, args, tmp, text))
            r = rows[-1]
            print(
                f"{shape}: peak {r['peak_rss_gb']:.2f} GB, target {r['target_gb']:.2f} GB",
                file=sys.stderr,
            )
    print(
        "| shape | split | layers | model GB | one layer GB | activations GB | OBS state GB | "
        "peak RSS GB | target GB | met | wall s |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    )
    for r in rows:
        print(
            f"| {r['shape']} | {r['split']} | {r['layers']} | {r['model_gb']:.2f} | "
            f"{r['layer_gb']:.2f} | "
            f"{r['activations_gb']:.3f} | {r['obs_state_gb']:.2f} | {r['peak_rss_gb']:.2f} | "
            f"{r['target_gb']:.2f} | {'yes' if r['met'] else 'no'} | {r['wall_s']:.0f} |"
        )
    if args.json:
        write_json(args.json, {"rows": rows, "argv": sys.argv[1:]})
    return rows


if __name__ == "__main__":
    main()
