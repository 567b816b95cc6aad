"""Structured magnitude: data-free. A unit's importance is the squared L2 norm of the weights
it owns (a query head its q rows and o columns, a KV group also its k/v rows, an FFN channel
its gate/up rows and down column). Squared norms rank single units as the norm does and add
up over the several units one GQA move removes. Weights are not changed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models import get_adapter
from ...plan import PruningPlan
from ...schedules import layer_ratios
from ..common import Budget, PruneConfig, finish, layer_targets, owned_scores


@dataclass
class MagnitudeConfig(PruneConfig):
    schedule: str | list = "uniform"


@torch.no_grad()
def prune(model, tokens, cfg: MagnitudeConfig, adapter=None) -> PruningPlan:
    """Per-layer GQA-valid selection at the schedule's ratios; tokens are unused."""
    adapter = adapter or get_adapter(model)
    layers = adapter.layers()
    ratios = layer_ratios(cfg.schedule, cfg.ratio, len(layers))
    budget = Budget()
    plans = [
        budget.plan(
            owned_scores(adapter, layer, lambda m: m.weight.detach().float() ** 2),
            adapter.unit_costs(layer),
            *layer_targets(adapter, layer, r),
        )
        for layer, r in zip(layers, ratios)
    ]
    return finish(
        plans, "magnitude", cfg, adapter, budget, schedule=cfg.schedule, layer_ratios=ratios
    )
