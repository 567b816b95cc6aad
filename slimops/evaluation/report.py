"""Reports of a throughput run (evaluation.throughput.run_bench's dict): a markdown table,
the JSON with every raw repeat, a PNG bar chart, the speedup line, and the environment
(device, versions) every report carries so numbers are never read without their machine."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

COLUMNS = (
    "model",
    "params",
    "MACs/token",
    "batch",
    "prompt",
    "prefill tok/s",
    "decode tok/s",
    "TTFT ms",
    "peak MB",
)


def stats(values: list[float]) -> dict:
    """median, min, max and IQR (0 for one value) of a list of repeats."""
    iqr = 0.0
    if len(values) >= 2:
        q = statistics.quantiles(values, n=4, method="inclusive")
        iqr = q[2] - q[0]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "iqr": iqr}


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _cell(stat: dict) -> str:
    """median ± half the min-max range over the repeats."""
    spread = (stat["max"] - stat["min"]) / 2
    digits = 0 if abs(stat["median"]) >= 100 else 1 if abs(stat["median"]) >= 10 else 2
    return f"{stat['median']:,.{digits}f} ± {spread:,.{digits}f}"


def markdown_table(report: dict) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for entry in report["models"]:
        for r in entry["results"]:
            rows.append(
                "| "
                + " | ".join(
                    [
                        entry["name"],
                        _human(entry["params"]),
                        _human(r["macs_per_token"]),
                        str(r["batch"]),
                        str(r["prompt"]),
                        _cell(r["prefill_tok_s"]),
                        _cell(r["decode_tok_s"]),
                        _cell(r["ttft_ms"]),
                        _cell(r["peak_mb"]),
                    ]
                )
                + " |"
            )
    return "\n".join(rows)


def footnotes(report: dict) -> str:
    s, env = report["settings"], report["environment"]
    lines = [
        f"device {env['device']} ({env['device_name']}), {s['dtype']}, torch "
        f"{env['torch']}, transformers {env['transformers']}, {env['cpu_threads']} CPU "
        f"threads; gen {s['gen']} tokens, {s['repeats']} repeats after {s['warmup']} "
        f"warm-up; median ± half the min-max range",
        "MACs/token at context = prompt: Linear in*out (decoder + lm_head) + "
        "2 * query heads * head_dim * prompt per layer",
        "decode tok/s = batch * (gen - 1) / (time of token gen - time of token 1), "
        "timed inside one generate call",
        f"peak MB: {report['peak_memory']}",
    ]
    for entry in report["models"]:
        compiled = ", torch.compile" if entry.get("compiled") else ", eager"
        lines.append(
            f"{entry['name']}: {entry['cache']} KV cache{compiled}"
            + "".join(f"; note: {n}" for n in entry["notes"])
        )
    return "\n".join(lines)


def speedup(report: dict) -> tuple[float, float]:
    """(decode, prefill) median speedup of the last model over the first at the first
    (batch, prompt) combination."""
    first, last = report["models"][0]["results"][0], report["models"][-1]["results"][0]
    return (
        last["decode_tok_s"]["median"] / first["decode_tok_s"]["median"],
        last["prefill_tok_s"]["median"] / first["prefill_tok_s"]["median"],
    )


def speedup_line(report: dict) -> str:
    decode, prefill = speedup(report)
    return f"speedup decode {decode:.2f} prefill {prefill:.2f}"


def write_json(report: dict, path) -> Path:
    decode, prefill = speedup(report)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            report | {"speedup": {"decode": decode, "prefill": prefill}}, indent=2, default=str
        )
        + "\n"
    )
    return path


def _bars(ax, report: dict, key: str) -> None:
    """Grouped bars: one group per (batch, prompt), one bar per model, min-max whiskers."""
    combos = [(r["batch"], r["prompt"]) for r in report["models"][0]["results"]]
    n = len(report["models"])
    width = 0.8 / n
    for i, entry in enumerate(report["models"]):
        med = [r[key]["median"] for r in entry["results"]]
        err = [
            [m - r[key]["min"] for m, r in zip(med, entry["results"])],
            [r[key]["max"] - m for m, r in zip(med, entry["results"])],
        ]
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(combos))]
        ax.bar(xs, med, width, yerr=err, capsize=3, label=entry["name"])
    ax.set_xticks(range(len(combos)), [f"b{b} p{p}" for b, p in combos])
    ax.set_ylabel("tokens / s")
    ax.set_title(key.replace("_tok_s", "") + " (median, min-max)")
    ax.grid(axis="y", alpha=0.3)


def write_plot(report: dict, path) -> Path:
    """PNG with prefill and decode tok/s per model side by side (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("prefill_tok_s", "decode_tok_s")):
        _bars(ax, report, key)
    axes[0].legend(fontsize=8)
    env, s = report["environment"], report["settings"]
    fig.suptitle(f"{env['device_name'] or env['device']} · {s['dtype']} · gen {s['gen']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def environment(device: torch.device) -> dict:
    """Device name, torch / transformers versions and CPU threads of this run."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
