"""What every pruning method shares: the config fields, the parameter budget with SlimGPT's
rounding carry, per-unit scores, the ONE GQA-valid head selector, FFN channel rounding,
input-feature statistics, and the PruningPlan every method returns.

GQA validity: a layer stays a valid GQA shape when every kept KV group keeps the same
number of query heads. Two moves preserve that, and they are the only moves any method
makes: remove a whole KV group (its query heads and its k/v head), or remove one query head
from every group. `remove_heads` repeats the cheaper move (score per parameter) until the
attention target is met to within half a move; what it scores with is the caller's
`HeadScorer` (static unit scores for the baselines, live OBS errors for SlimGPT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import nn

from .. import distributed
from ..plan import LayerPlan, PruningPlan
from ..sequential import LayerWork


def check_ratio(ratio: float) -> None:
    """The one ratio contract: a share of decoder-layer parameters strictly inside (0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(
            f"--ratio {ratio} is outside (0, 1): it is the share of decoder-layer "
            "parameters to remove, e.g. 0.2"
        )


@dataclass
class PruneConfig:
    """Fields every method has. `schedule`: per-layer ratios (schedules.layer_ratios); each
    method's config sets its own default, which is the method's default schedule."""

    ratio: float = 0.2  # share of decoder-layer parameters to remove
    schedule: str | list | None = "uniform"
    batch_size: int = 8  # calibration sequences per forward (/backward)
    device: str = "cpu"
    offload: str = field(
        default="auto",
        metadata={
            "help": "where calibration activations wait between layers: auto (the "
            "GPU while they take under half its free memory) | cpu | none"
        },
    )

    def __post_init__(self):
        check_ratio(self.ratio)
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size} must be >= 1")

    def driver(self) -> dict:
        """sequential.run_sequential's device, batch_size and offload for this config."""
        return {"device": self.device, "batch_size": self.batch_size, "offload": self.offload}

    def streams(self) -> bool:
        """Whether each layer is decided from its own inputs alone, so the layers can come
        one at a time from a layer source (--stream). Methods that need every layer at once
        (a global threshold, gradients, a whole-model fitness) do not."""
        return False


@dataclass
class UnitScores:
    """Importance of every removable unit of one layer (float64, higher = keep)."""

    heads: torch.Tensor  # [num_heads] a query head
    kv: torch.Tensor  # [num_kv_heads] a KV group's own k/v rows (0 if not scored)
    channels: torch.Tensor  # [intermediate_size] an FFN channel


# ---- the GQA head selector -------------------------------------------------------------


class HeadScorer(Protocol):
    """Cost of removing heads (lower = remove first), as the selector asks for it."""

    def group_scores(self, groups: dict[int, list[int]]) -> list[float]: ...
    def head_scores(self, heads: list[int]) -> list[float]: ...
    def joint_score(self, heads: list[int]) -> float: ...
    def remove(self, heads: list[int]) -> None: ...


class Move(NamedTuple):
    score: float
    cost: float  # parameters it removes
    heads: list[int]  # query heads it removes
    group: int | None  # the KV group it removes, if any


def gqa_moves(
    scorer: HeadScorer, alive: dict[int, list[int]], costs: dict, whole_groups: bool = False
) -> list[Move]:
    """The two GQA-preserving moves from `alive` (group -> its kept heads), best of each."""
    per, moves = len(next(iter(alive.values()))), []
    if len(alive) > 1:  # a whole KV group
        scores = scorer.group_scores(alive)
        i = min(range(len(scores)), key=scores.__getitem__)
        g = list(alive)[i]
        moves.append(Move(scores[i], per * costs["head"] + costs["kv_head"], alive[g], g))
    if per > 1 and not whole_groups:  # one query head from every group
        flat = scorer.head_scores([h for hs in alive.values() for h in hs])
        chosen = [
            hs[min(range(per), key=lambda j: flat[i * per + j])]
            for i, hs in enumerate(alive.values())
        ]
        moves.append(Move(scorer.joint_score(chosen), len(alive) * costs["head"], chosen, None))
    return moves


def remove_heads(
    scorer: HeadScorer,
    num_heads: int,
    num_kv: int,
    costs: dict,
    target: float,
    whole_groups: bool = False,
    overshoot: float = 0.5,
    in_heads: bool = False,
    history: list | None = None,
) -> tuple[list[int], list[int], float]:
    """Greedy removal, lowest score per parameter first, until `target` is removed: params,
    or query heads when `in_heads`. A move is taken while it overshoots the target by at most
    `overshoot` times its own size (0.5: round to the nearest move; 1: until at least the
    target is removed). The last group's last
    head is never removed; `whole_groups` allows whole KV groups only; every move taken is
    appended to `history`. Returns kept query heads, kept KV groups, params removed."""
    rep = num_heads // num_kv
    alive = {g: list(range(g * rep, (g + 1) * rep)) for g in range(num_kv)}
    removed, done = 0, 0

    def size(m: Move) -> float:
        return len(m.heads) if in_heads else m.cost

    while True:
        moves = [
            m
            for m in gqa_moves(scorer, alive, costs, whole_groups)
            if (done < target if overshoot >= 1 else done + size(m) * (1 - overshoot) <= target)
        ]
        if not moves:
            break
        move = min(moves, key=lambda m: m.score / m.cost)
        scorer.remove(move.heads)
        if history is not None:
            history.append(move)
        alive = {
            g: [h for h in hs if h not in move.heads] for g, hs in alive.items() if g != move.group
        }
        removed, done = removed + move.cost, done + size(move)
    return sorted(h for hs in alive.values() for h in hs), sorted(alive), removed


class StaticScorer:
    """Unit scores that do not change as heads go (the baselines): additive over a move."""

    def __init__(self, scores: UnitScores):
        self.head, self.kv = scores.heads.tolist(), scores.kv.tolist()

    def group_scores(self, groups):
        return [sum(self.head[h] for h in hs) + self.kv[g] for g, hs in groups.items()]

    def head_scores(self, heads):
        return [self.head[h] for h in heads]

    def joint_score(self, heads):
        return sum(self.head[h] for h in heads)

    def remove(self, heads):
        pass


def select_heads(scores: UnitScores, costs: dict, target: float) -> tuple[list, list, float]:
    """remove_heads on static scores: kept heads, kept KV groups, params removed."""
    nh, nkv = len(scores.heads), len(scores.kv)
    return remove_heads(StaticScorer(scores), nh, nkv, costs, target)


# ---- FFN channels and the per-layer budget ---------------------------------------------


def channels_to_remove(params: float, channel_cost: int, ffn: int) -> int:
    """Whole channels nearest to `params` parameters, keeping at least one channel."""
    return max(0, min(ffn - 1, int(round(params / channel_cost))))


def select_channels(scores: torch.Tensor, n_remove: int) -> list[int]:
    """Kept FFN channels after dropping the n_remove lowest-scored (stable on ties)."""
    drop = set(torch.argsort(scores, stable=True)[:n_remove].tolist())
    return [c for c in range(len(scores)) if c not in drop]


def plan_layer(
    scores: UnitScores, costs: dict, attn_target: float, target: float
) -> tuple[LayerPlan, float]:
    """Heads up to attn_target params, then FFN channels for the rest of `target` (the FFN's
    fine granularity absorbs the heads' rounding). Keeps >= 1 channel. (plan, removed)."""
    heads, kv, removed = select_heads(scores, costs, attn_target)
    n = channels_to_remove(target - removed, costs["channel"], len(scores.channels))
    return LayerPlan(heads, kv, select_channels(scores.channels, n)), removed + n * costs["channel"]


@dataclass
class Budget:
    """Per-layer parameter targets plus the rounding still owed by earlier layers (SlimGPT's
    carry), so the decoder total hits the ratio although each layer moves in whole units."""

    carry: float = 0.0
    removed: list = field(default_factory=list)  # params removed, per layer

    def open(self, target: float) -> float:
        """This layer's target with what earlier layers owe added."""
        return target + self.carry

    def close(self, target: float, removed: float) -> None:
        self.carry = target - removed
        self.removed.append(removed)

    def plan(self, scores: UnitScores, costs: dict, attn_target: float, target: float) -> LayerPlan:
        target = self.open(target)
        lp, removed = plan_layer(scores, costs, min(attn_target, target), target)
        self.close(target, removed)
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
    imp = {
        role: importance(adapter.linear(layer, role)).double()
        for role in ("q", "k", "v", "o", "gate", "up", "down")
        if adapter.linear(layer, role) is not None
    }
    heads = imp["q"].reshape(nh, -1).sum(1) + imp["o"].reshape(-1, nh, hd).sum((0, 2))
    kv = imp["k"].reshape(nkv, -1).sum(1) + imp["v"].reshape(nkv, -1).sum(1)
    channels = sum(imp[r].sum(1) for r in ("gate", "up") if r in imp) + imp["down"].sum(0)
    return UnitScores(heads.cpu(), kv.cpu(), channels.cpu())


def column_scores(adapter, layer, o_cols: torch.Tensor, down_cols: torch.Tensor) -> UnitScores:
    """Units from per-input-column scores of o_proj and down_proj (a head = its head_dim
    columns summed); k/v rows are not scored by these metrics."""
    nh, nkv, _ = adapter.layer_shape(layer)
    return UnitScores(
        o_cols.double().reshape(nh, adapter.head_dim).sum(1).cpu(),
        torch.zeros(nkv, dtype=torch.float64),
        down_cols.double().cpu(),
    )


class InputStats:
    """Per-feature mean and sum of squared deviations (M2) of one Linear's input over the
    calibration tokens, merged batch by batch (Chan et al.'s parallel update): each batch
    is centred on its own mean in (at least) fp32 (no fp64 copy of the activations), the
    running values are fp64, and no E[x^2] - E[x]^2 cancellation ever happens."""

    def __init__(self, features: int, device):
        self.count = 0
        self.mean_ = torch.zeros(features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(features, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> fp32
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = (x - mean_b).pow(2).sum(0).double()
        delta = mean_b.double() - self.mean_
        n = self.count + n_b
        self.m2 += m2_b + delta.pow(2) * (self.count * n_b / n)
        self.mean_ += delta * (n_b / n)
        self.count = n

    def reduce(self) -> InputStats:
        """Merge every rank's statistics (torch.distributed), in rank order; a no-op alone."""
        parts = distributed.all_gather(
            torch.cat(
                [torch.tensor([float(self.count)], device=self.m2.device), self.mean_, self.m2]
            )
        )
        if len(parts) == 1:
            return self
        merged = InputStats(len(self.mean_), self.m2.device)
        for part in parts:
            n_b, mean_b, m2_b = (
                int(part[0]),
                part[1 : 1 + len(self.mean_)],
                part[1 + len(self.mean_) :],
            )
            n = merged.count + n_b
            if n_b:
                delta = mean_b - merged.mean_
                merged.m2 += m2_b + delta.pow(2) * (merged.count * n_b / n)
                merged.mean_ += delta * (n_b / n)
                merged.count = n
        return merged

    def mean(self) -> torch.Tensor:
        return self.mean_

    def norm(self) -> torch.Tensor:  # ||X_j||_2 over all calibration tokens
        return (self.m2 + self.count * self.mean_.pow(2)).sqrt()

    def var(self) -> torch.Tensor:  # unbiased, 1/(N-1) as FLAP's eq. 5
        return self.m2 / max(self.count - 1, 1)


@torch.no_grad()
def input_stats(work: LayerWork, modules: dict[str, nn.Linear]) -> dict[str, InputStats]:
    """Per-feature statistics of each module's input over the layer's calibration inputs,
    gathered by forward pre-hooks (as LayerWork.hessians does) in one pass."""
    stats = {n: InputStats(m.in_features, work.device) for n, m in modules.items()}
    work.observe_inputs(modules, lambda name, x: stats[name].update(x))
    return {n: s.reduce() for n, s in stats.items()}


def finish(
    plans: list,
    method: str,
    cfg: PruneConfig,
    adapter,
    budget: Budget,
    sizes: list | None = None,
    **info,
) -> PruningPlan:
    """The PruningPlan with the info every method records (achieved per-layer ratios of the
    dense layer sizes `sizes`, read from the model when None)."""
    sizes = sizes or [adapter.layer_params(layer) for layer in adapter.layers()]
    info["achieved_layer_ratios"] = [r / n for r, n in zip(budget.removed, sizes)]
    return PruningPlan(plans, method=method, target_ratio=cfg.ratio, info=info)
