"""Baseline structured-pruning methods, computed in the same harness as SlimGPT.

    magnitude  structured magnitude, data-free: a unit's importance is the (squared) L2 norm
               of the weights it owns. A query head owns its q rows and o columns, a KV group
               also its k/v rows, an FFN channel its gate/up rows and down column.
    wanda-sp   structured Wanda as in FLAP (An et al., AAAI 2024, Sec. 4 "Wanda-sp"): input
               channel j of o_proj / down_proj scores
                   S_j = sum_i |W_ij| * ||X_j||_2                       (Wanda, Sun et al. eq. 1,
               summed over the column), a head the sum over its head_dim columns.
    flap       fluctuation metric + global adaptive structure + bias compensation: flap.py.
    taylor     first-order Taylor importance (LLM-Pruner, Ma et al. 2023): taylor.py.

What they share lives here: the config, per-layer ratios from `schedules.layer_ratios` with
rounding carried between layers (the total hits the target, as in SlimGPT), input-feature
statistics gathered through forward pre-hooks, and ONE GQA-valid selector (`plan_layer`):
greedy removal of the lowest score-per-parameter unit under a parameter budget, where a unit
is a whole KV group or one query head from every group (the two moves that keep GQA valid).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..plan import LayerPlan, PruningPlan
from ..schedules import layer_ratios
from ..sequential import LayerWork, run_sequential
from ..slicing import mask_layer

BASELINES = ("magnitude", "wanda-sp", "flap", "taylor")


@dataclass
class BaselineConfig:
    ratio: float = 0.2                      # share of decoder-layer parameters to remove
    schedule: str | list = "uniform"        # per-layer ratios (flap ignores it: adaptive)
    batch_size: int = 8                     # calibration sequences per forward (/backward)
    device: str = "cpu"
    align: int | None = None                # slimgpt only; accepted so the CLI can pass it
    bias_compensation: bool = True          # flap only: FLAP's baseline bias (Sec. 3.3)

    def __post_init__(self):
        if self.align not in (None, 1):
            raise ValueError("--align is implemented for slimgpt only")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio {self.ratio} is outside [0, 1)")


@dataclass
class UnitScores:
    """Importance of every removable unit of one layer (float64, higher = keep)."""
    heads: torch.Tensor       # [num_heads] a query head
    kv: torch.Tensor          # [num_kv_heads] a KV group's own k/v rows (0 if not scored)
    channels: torch.Tensor    # [intermediate_size] an FFN channel


# ---- the shared selector ---------------------------------------------------------------

def _moves(alive: dict, head: list, kv: list, costs: dict) -> list[tuple]:
    """The two GQA-preserving moves from `alive` (group -> its kept heads), each as
    (score per param, params, heads removed, group removed or None)."""
    per, moves = len(next(iter(alive.values()))), []
    if len(alive) > 1:                               # a whole KV group: heads + k/v rows
        cost = per * costs["head"] + costs["kv_head"]
        score, g = min((sum(head[h] for h in hs) + kv[g], g) for g, hs in alive.items())
        moves.append((score / cost, cost, alive[g], g))
    if per > 1:                                      # one query head from every group
        chosen = [min(hs, key=head.__getitem__) for hs in alive.values()]
        cost = len(alive) * costs["head"]
        moves.append((sum(head[h] for h in chosen) / cost, cost, chosen, None))
    return moves


def select_heads(scores: UnitScores, costs: dict, target: float) -> tuple[list, list, float]:
    """Remove heads greedily, lowest score per parameter first, until `target` params are
    removed (rounding to the nearest move). Every move keeps GQA valid and the last
    group's last head is never removed. Returns kept heads, kept KV groups, params removed."""
    head, kv = scores.heads.tolist(), scores.kv.tolist()
    rep = len(head) // len(kv)
    alive = {g: list(range(g * rep, (g + 1) * rep)) for g in range(len(kv))}
    removed = 0.0
    while True:
        moves = [m for m in _moves(alive, head, kv, costs) if removed + m[1] / 2 <= target]
        if not moves:
            break
        _, cost, heads, group = min(moves, key=lambda m: m[0])
        alive = {g: [h for h in hs if h not in heads] for g, hs in alive.items() if g != group}
        removed += cost
    return sorted(h for hs in alive.values() for h in hs), sorted(alive), removed


def select_channels(scores: torch.Tensor, n_remove: int) -> list[int]:
    """Kept FFN channels after dropping the n_remove lowest-scored (stable on ties)."""
    drop = set(torch.argsort(scores, stable=True)[:n_remove].tolist())
    return [c for c in range(len(scores)) if c not in drop]


def plan_layer(scores: UnitScores, costs: dict, attn_target: float,
               target: float) -> tuple[LayerPlan, float]:
    """Heads up to attn_target params, then FFN channels for the rest of `target` (the FFN's
    fine granularity absorbs the heads' rounding). Keeps >= 1 channel. (plan, removed)."""
    heads, kv, removed = select_heads(scores, costs, attn_target)
    n = int(round((target - removed) / costs["channel"]))
    n = max(0, min(len(scores.channels) - 1, n))
    return LayerPlan(heads, kv, select_channels(scores.channels, n)), removed + n * costs["channel"]


@dataclass
class Budget:
    """Per-layer targets plus the rounding still owed by earlier layers (SlimGPT's carry)."""
    carry: float = 0.0
    removed: list = field(default_factory=list)          # params removed, per layer

    def plan(self, scores: UnitScores, costs: dict, attn_target: float,
             target: float) -> LayerPlan:
        target += self.carry
        lp, removed = plan_layer(scores, costs, min(attn_target, target), target)
        self.carry = target - removed
        self.removed.append(removed)
        return lp


def layer_targets(adapter, layer, ratio: float) -> tuple[float, float]:
    """(attention, whole-layer) params to remove: the layer's ratio split between attention
    and FFN in proportion to their params (attention target = ratio * attention params)."""
    nh, nkv, _ = adapter.layer_shape(layer)
    costs = adapter.unit_costs(layer)
    attn = nh * costs["head"] + nkv * costs["kv_head"]
    return ratio * attn, ratio * adapter.layer_params(layer)


# ---- per-unit scores from weights or input statistics -----------------------------------

def owned_scores(adapter, layer, importance: Callable[[nn.Linear], torch.Tensor]) -> UnitScores:
    """Sum an element-wise importance (shaped like each weight) over the weights a unit owns:
    head = q rows + o columns, KV group = k/v rows, channel = gate/up rows + down column."""
    nh, nkv, _ = adapter.layer_shape(layer)
    hd = adapter.head_dim
    imp = {role: importance(adapter.linear(layer, role)).double()
           for role in ("q", "k", "v", "o", "gate", "up", "down")
           if adapter.linear(layer, role) is not None}
    heads = imp["q"].reshape(nh, -1).sum(1) + imp["o"].reshape(-1, nh, hd).sum((0, 2))
    kv = imp["k"].reshape(nkv, -1).sum(1) + imp["v"].reshape(nkv, -1).sum(1)
    channels = sum(imp[r].sum(1) for r in ("gate", "up") if r in imp) + imp["down"].sum(0)
    return UnitScores(heads.cpu(), kv.cpu(), channels.cpu())


def column_scores(adapter, layer, o_cols: torch.Tensor, down_cols: torch.Tensor) -> UnitScores:
    """Units from per-input-column scores of o_proj and down_proj (a head = its head_dim
    columns summed); k/v rows are not scored by these metrics."""
    nh, nkv, _ = adapter.layer_shape(layer)
    return UnitScores(o_cols.double().reshape(nh, adapter.head_dim).sum(1).cpu(),
                      torch.zeros(nkv, dtype=torch.float64), down_cols.double().cpu())


class InputStats:
    """Per-feature mean and sum of squared deviations (M2) of one Linear's input over the
    calibration tokens, merged batch by batch (Chan et al.'s parallel update): each batch
    is centred on its own mean in (at least) fp32 (no fp64 copy of the activations), the running
    values are fp64, and no E[x^2] - E[x]^2 cancellation ever happens."""

    def __init__(self, features: int, device):
        self.count = 0
        self.mean_ = torch.zeros(features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(features, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        x = x.to(torch.promote_types(x.dtype, torch.float32))       # bf16/fp16 -> fp32
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = (x - mean_b).pow(2).sum(0).double()
        delta = mean_b.double() - self.mean_
        n = self.count + n_b
        self.m2 += m2_b + delta.pow(2) * (self.count * n_b / n)
        self.mean_ += delta * (n_b / n)
        self.count = n

    def mean(self) -> torch.Tensor:
        return self.mean_

    def norm(self) -> torch.Tensor:              # ||X_j||_2 over all calibration tokens
        return (self.m2 + self.count * self.mean_.pow(2)).sqrt()

    def var(self) -> torch.Tensor:               # unbiased, 1/(N-1) as FLAP's eq. 5
        return self.m2 / max(self.count - 1, 1)


@torch.no_grad()
def input_stats(work: LayerWork, modules: dict[str, nn.Linear]) -> dict[str, InputStats]:
    """Per-feature statistics of each module's input over the layer's calibration inputs,
    gathered by forward pre-hooks (as LayerWork.hessians does) in one pass."""
    stats = {n: InputStats(m.in_features, work.device) for n, m in modules.items()}
    work.observe_inputs(modules, lambda name, x: stats[name].update(x))
    return stats


def wanda_columns(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Wanda-sp: S_j = sum_i |W_ij| * ||X_j||_2 for every input column j."""
    return weight.detach().double().abs().sum(0) * stats.norm().to(weight.device)


# ---- the methods ---------------------------------------------------------------------

def finish(plans: list, method: str, cfg: BaselineConfig, adapter, budget: Budget,
           sizes: list | None = None, **info) -> PruningPlan:
    """The PruningPlan with the info every baseline records (achieved per-layer ratios of
    the dense layer sizes `sizes`, read from the model when None)."""
    sizes = sizes or [adapter.layer_params(layer) for layer in adapter.layers()]
    info["achieved_layer_ratios"] = [r / n for r, n in zip(budget.removed, sizes)]
    return PruningPlan(plans, method=method, target_ratio=cfg.ratio, info=info)


@torch.no_grad()
def prune_magnitude(model, tokens, cfg: BaselineConfig, adapter=None) -> PruningPlan:
    """Structured magnitude. Data-free (tokens unused); no weight changes. Scores are
    squared norms: same ranking as the L2 norm for single units, and additive over the
    several units one GQA move removes."""
    adapter = adapter or _adapter(model)
    layers = adapter.layers()
    ratios = layer_ratios(cfg.schedule, cfg.ratio, len(layers))
    budget = Budget()
    plans = [budget.plan(owned_scores(adapter, layer, lambda m: m.weight.detach().float() ** 2),
                         adapter.unit_costs(layer), *layer_targets(adapter, layer, r))
             for layer, r in zip(layers, ratios)]
    return finish(plans, "magnitude", cfg, adapter, budget, schedule=cfg.schedule,
                  layer_ratios=ratios)


def prune_wanda_sp(model, tokens, cfg: BaselineConfig, adapter=None) -> PruningPlan:
    """Wanda-sp, layer by layer (sequential.run_sequential): o_proj and down_proj input
    norms from one forward of the layer, score, select, then zero the removed columns so
    the next layer calibrates on the pruned outputs, as Wanda does."""
    adapter = adapter or _adapter(model)
    ratios = layer_ratios(cfg.schedule, cfg.ratio, len(adapter.layers()))
    budget, plans = Budget(), []

    def per_layer(work: LayerWork) -> None:
        layer = work.layer
        o, down = adapter.o_proj(layer), adapter.down_proj(layer)
        stats = input_stats(work, {"o": o, "down": down})
        scores = column_scores(adapter, layer, wanda_columns(o.weight, stats["o"]),
                               wanda_columns(down.weight, stats["down"]))
        lp = budget.plan(scores, adapter.unit_costs(layer),
                         *layer_targets(adapter, layer, ratios[work.index]))
        mask_layer(adapter, layer, lp)
        plans.append(lp)

    timer = run_sequential(model, adapter, tokens, per_layer, device=cfg.device,
                           batch_size=cfg.batch_size, desc="wanda-sp")
    return finish(plans, "wanda-sp", cfg, adapter, budget, schedule=cfg.schedule,
                  layer_ratios=ratios, phase_seconds=timer.seconds)


def _adapter(model):
    from ..models import get_adapter
    return get_adapter(model)


def pruner(method: str) -> Callable:
    """prune(model, tokens, cfg, adapter) of a baseline method."""
    if method == "magnitude":
        return prune_magnitude
    if method == "wanda-sp":
        return prune_wanda_sp
    if method == "flap":
        from .flap import prune
        return prune
    if method == "taylor":
        from .taylor import prune
        return prune
    raise ValueError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}")


def prune(model, tokens: torch.Tensor, method: str, cfg: BaselineConfig,
          adapter=None) -> PruningPlan:
    """Run baseline `method`; the model is changed in place only where the method changes
    weights (wanda-sp / flap zero removed columns, flap adds biases). Slice with
    slicing.apply_plan."""
    return pruner(method)(model, tokens, cfg, adapter or _adapter(model))
