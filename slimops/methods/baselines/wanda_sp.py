"""Structured Wanda as in FLAP (An et al., AAAI 2024, Sec. 4 "Wanda-sp"): input channel j of
o_proj / down_proj scores

    S_j = sum_i |W_ij| * ||X_j||_2                      (Wanda, Sun et al. eq. 1, summed
                                                          over the column)

a head the sum over its head_dim columns. Layer by layer (sequential.run_sequential): the
o_proj and down_proj input norms come from one forward of the layer, then the layer is
scored, selected and masked, so the next layer calibrates on the pruned outputs, as Wanda."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models import get_adapter
from ...plan import PruningPlan
from ...schedules import layer_ratios
from ...sequential import LayerWork, run_sequential
from ...slicing import mask_layer
from ..common import (
    Budget,
    InputStats,
    PruneConfig,
    column_scores,
    finish,
    input_stats,
    layer_targets,
)


@dataclass
class WandaSpConfig(PruneConfig):
    schedule: str | list = "uniform"


def wanda_columns(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Wanda-sp: S_j = sum_i |W_ij| * ||X_j||_2 for every input column j."""
    return weight.detach().double().abs().sum(0) * stats.norm().to(weight.device)


def prune(model, tokens: torch.Tensor, cfg: WandaSpConfig, adapter=None) -> PruningPlan:
    adapter = adapter or get_adapter(model)
    ratios = layer_ratios(cfg.schedule, cfg.ratio, len(adapter.layers()))
    budget, plans = Budget(), []

    def per_layer(work: LayerWork) -> None:
        layer = work.layer
        o, down = adapter.o_proj(layer), adapter.down_proj(layer)
        stats = input_stats(work, {"o": o, "down": down})
        scores = column_scores(
            adapter,
            layer,
            wanda_columns(o.weight, stats["o"]),
            wanda_columns(down.weight, stats["down"]),
        )
        lp = budget.plan(
            scores, adapter.unit_costs(layer), *layer_targets(adapter, layer, ratios[work.index])
        )
        mask_layer(adapter, layer, lp)
        plans.append(lp)

    timer = run_sequential(model, adapter, tokens, per_layer, desc="wanda-sp", **cfg.driver())
    return finish(
        plans,
        "wanda-sp",
        cfg,
        adapter,
        budget,
        schedule=cfg.schedule,
        layer_ratios=ratios,
        phase_seconds=timer.seconds,
    )
