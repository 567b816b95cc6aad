"""What `search` reports beyond the prune summary: search time, candidates evaluated and per
second, and the Pareto front of fitness against kept params and kept MACs, as a PNG."""

from __future__ import annotations

import io


def summary_lines(info: dict) -> list[str]:
    """Lines for PruneReport.summary() when the plan came from search."""
    if "search_seconds" not in info:
        return []
    best = info["generations"][-1]["best"] if info.get("generations") else float("nan")
    return [
        f"search: {info['candidates_evaluated']} candidates in {info['search_seconds']:.1f} s "
        f"({info['candidates_per_second']:.2f}/s), best fitness ({info['fitness']}) "
        f"{best:.4g}; saliency {info['saliency_seconds']:.1f} s, reformation "
        f"({info['reformation']}) {info['reformation_seconds']:.1f} s; inheriting ratio "
        f"{info['inherit']:.3f}"
    ]


def pareto_png(info: dict) -> bytes:
    """PNG: every candidate's fitness against kept params and kept MACs (colour = generation)
    with the Pareto front over all of them, and the best fitness per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = info["candidates"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, front in (
        (axes[0], "params_removed", "pareto_params"),
        (axes[1], "macs_removed", "pareto_macs"),
    ):
        points = ax.scatter(
            [1 - c[key] for c in cands],
            [c["fitness"] for c in cands],
            c=[c["generation"] for c in cands],
            s=10,
            cmap="viridis",
        )
        if info[front]:
            ax.plot(*zip(*info[front]), color="red", marker="o", ms=3, label="Pareto front")
        ax.set_xlabel(f"share of dense {key.split('_')[0]} kept")
        ax.set_ylabel(f"fitness ({info['fitness']}, lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.colorbar(points, ax=axes[1], label="generation")
    gens = info["generations"]
    axes[2].plot(
        [g["generation"] for g in gens], [g["best"] for g in gens], marker="o", label="best"
    )
    axes[2].plot([g["generation"] for g in gens], [g["median"] for g in gens], label="median")
    axes[2].set_xlabel("generation")
    axes[2].set_ylabel("fitness")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
