"""What `slimops train` draws: the domain weights of dynamic batch loading over the steps of
both stages (pruning, then continued pretraining), and each domain's validation loss."""

from __future__ import annotations

import io


def weights_png(log: dict) -> bytes:
    """PNG: domain weights (left) and validation losses (right) at every evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _points(log)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colors = plt.cm.tab20.colors  # up to 20 domains tell apart
    steps = [p["step"] for p in points]
    for i, name in enumerate(log["domains"]):
        style = {"marker": ".", "label": name, "color": colors[i % len(colors)]}
        axes[0].plot(steps, [p["weights"][i] for p in points], **style)
        axes[1].plot(steps, [p["losses"][i] for p in points], **style)
    offset = _shear_steps(log)
    for ax, label in ((axes[0], "domain weight"), (axes[1], "validation loss")):
        if offset:
            ax.axvline(offset, color="grey", ls="--", lw=1)
        ax.set_xlabel("step (pruning stage, then continued pretraining)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _shear_steps(log: dict) -> int:
    shear = log.get("shear")
    return shear["config"]["steps"] if isinstance(shear, dict) else 0


def _points(log: dict) -> list[dict]:
    """Every evaluation of both stages on one step axis."""
    offset = _shear_steps(log)
    out = []
    if isinstance(log.get("shear"), dict):
        out += log["shear"].get("mixture", [])
    out += [{**p, "step": p["step"] + offset} for p in log["cpt"].get("mixture", [])]
    return out
