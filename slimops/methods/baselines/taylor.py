"""First-order Taylor importance, LLM-Pruner style (Ma et al., NeurIPS 2023).

LLM-Pruner eq. 3-4 (element-wise, first order): removing weight W_k changes the loss by

    I(W_k) = |L(W_k = 0) - L(W_k)| ~= |dL/dW_k * W_k|

with L the language-model loss on the calibration tokens, gradients through the whole
model. A group's importance is the sum over its weights (LLM-Pruner's "sum" aggregation):
a query head owns its q rows and o columns, a KV group also its k/v rows, an FFN channel its
gate/up rows and down column. Selection, per-layer ratios and the rounding carry are the
shared machinery (common.plan_layer / Budget). Weights are not changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import distributed
from ...models import get_adapter
from ...plan import PruningPlan
from ...schedules import layer_ratios
from ..common import Budget, PruneConfig, UnitScores, finish, layer_targets, owned_scores


@dataclass
class TaylorConfig(PruneConfig):
    schedule: str | list = "uniform"  # LLM-Pruner's setting


ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _projection_weights(adapter) -> list[torch.nn.Parameter]:
    return [
        m.weight
        for layer in adapter.layers()
        for role in ROLES
        if (m := adapter.linear(layer, role)) is not None
    ]


def accumulate_gradients(model, tokens: torch.Tensor, batch_size: int) -> None:
    """dL/dW into .grad of every projection weight, L = mean next-token NLL over ALL
    calibration tokens (LLM-Pruner's one-batch loss), computed batch by batch to bound
    memory: each batch's mean loss is weighted by its share of the sequences, so the sum
    of the backward passes is the gradient of the whole-set loss whatever the batch size
    (under torch.distributed: the sequences of every rank, gradients summed over ranks)."""
    device = next(model.parameters()).device
    n = distributed.all_sum_float(float(tokens.shape[0]))
    with torch.enable_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            out = model(input_ids=batch, labels=batch, use_cache=False)
            (out.loss * (batch.shape[0] / n)).backward()
    for w in model.parameters():
        if w.grad is not None:
            distributed.all_sum(w.grad)


def taylor_scores(
    model, tokens: torch.Tensor, adapter, batch_size: int = 8, device="cpu"
) -> list[UnitScores]:
    """Per-layer UnitScores of sum |W * dL/dW|. Only projection weights get gradients
    (embeddings, norms and lm_head are frozen for the pass: less memory, same scores);
    requires_grad flags, .grad and the model's device are restored afterwards."""
    if not getattr(adapter, "causal_lm", True):
        raise ValueError(
            "taylor needs a language-model loss: it supports causal LMs only "
            "(use magnitude, wanda-sp or flap for encoders)"
        )
    home = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    model.to(device)
    weights = _projection_weights(adapter)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        accumulate_gradients(model, tokens, batch_size)
        with torch.no_grad():
            return [
                owned_scores(
                    adapter, layer, lambda m: (m.weight.detach().double() * m.weight.grad).abs()
                )
                for layer in adapter.layers()
            ]
    finally:
        for w in weights:
            w.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.to(home)


def prune(model, tokens: torch.Tensor, cfg: TaylorConfig, adapter=None) -> PruningPlan:
    """Taylor baseline: scores from one gradient pass, then per-layer GQA-valid selection
    at the schedule's ratios (uniform by default, as LLM-Pruner)."""
    adapter = adapter or get_adapter(model)
    layers = adapter.layers()
    ratios = layer_ratios(cfg.schedule, cfg.ratio, len(layers))
    scores = taylor_scores(model, tokens, adapter, cfg.batch_size, cfg.device)
    budget = Budget()
    plans = [
        budget.plan(s, adapter.unit_costs(layer), *layer_targets(adapter, layer, r))
        for s, layer, r in zip(scores, layers, ratios)
    ]
    return finish(plans, "taylor", cfg, adapter, budget, schedule=cfg.schedule, layer_ratios=ratios)
