"""FLAP (An et al., AAAI 2024): fluctuation-based adaptive structured pruning, retraining-free.

1. Fluctuation metric (eq. 5): for input channel j of o_proj / down_proj,
       S_j = 1/(N-1) * sum_n (X_nj - mean_j)^2 * ||W_:,j||_2^2  =  Var(X_j) * ||W_:,j||^2
   a head scoring the sum over its head_dim channels. A channel whose input barely moves
   can be replaced by its mean (step 3), whatever its magnitude.
2. Adaptive structure search (eq. 6-7): standardise the scores within each layer and
   module, S' = (S - E[S]) / std(S), so attention heads and FFN channels of every layer
   are comparable; then ONE global threshold over all layers and both modules removes the
   lowest units until the removed decoder params reach the ratio. As in the authors' code,
   attention is standardised per o_proj input COLUMN and a head's score is the mean of its
   columns' z-scores (standardising per-head sums instead removes far too many heads:
   benchmarks/RESULTS.md). Per-layer widths follow from the data; there is no schedule.
3. Bias compensation (eq. 8): the removed channels' average contribution is kept,
       b_new = b + W[:, removed] @ mean(X[removed]),
   a bias is created on o_proj / down_proj when the module has none.

The statistics come from ONE sequential pass over the DENSE model (sequential.run_sequential,
one layer on the device at a time), as the authors' code does: the global threshold needs
every layer's scores before any layer can be pruned, so layer i+1 calibrates on dense
layer-i outputs. Then the threshold is applied, and each layer is masked and compensated.
GQA: the threshold gives each layer a head budget (per-head cost = q rows + o columns +
1/rep of a KV group's k/v rows); the shared selector (common.plan_layer) turns it into a
valid GQA shape, and the rounding goes to that layer's FFN, then to the next layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...models import get_adapter
from ...plan import LayerPlan, PruningPlan
from ...sequential import LayerWork, run_sequential
from ...slicing import head_rows, mask_layer
from ..common import Budget, InputStats, PruneConfig, UnitScores, finish, input_stats


@dataclass
class FlapConfig(PruneConfig):
    schedule: None = None  # adaptive: one global threshold sets the widths
    bias_compensation: bool = True  # FLAP's baseline bias (Sec. 3.3, eq. 8)

    def __post_init__(self):
        super().__post_init__()
        if self.schedule is not None:
            raise ValueError(
                "flap chooses per-layer widths itself (one global threshold); "
                "it takes no --schedule"
            )


def fluctuation_columns(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """FLAP eq. 5: S_j = Var(X_j) * ||W_:,j||_2^2 for every input column j."""
    return stats.var().to(weight.device) * weight.detach().double().pow(2).sum(0)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """FLAP eq. 6: (S - mean) / std within one layer and module (0 when all equal)."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    std = scores.std()
    return (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)


def standardized_units(adapter, layer, o_cols: torch.Tensor, down_cols: torch.Tensor) -> UnitScores:
    """FLAP eq. 6 as the authors compute it: z-scores of o_proj's input columns within the
    layer, a head = the mean of its head_dim columns; z-scores of down_proj's columns."""
    nh, nkv, _ = adapter.layer_shape(layer)
    heads = standardize(o_cols.double()).reshape(nh, adapter.head_dim).mean(1)
    return UnitScores(
        heads.cpu(), torch.zeros(nkv, dtype=torch.float64), standardize(down_cols.double()).cpu()
    )


def global_threshold(
    scores: list[UnitScores], costs: list[dict], reps: list[int], target: float
) -> tuple[float, list[tuple[int, int]]]:
    """FLAP eq. 7: sort all standardised head and channel scores of all layers together and
    remove the lowest k, k chosen so their params come closest to `target`.
    Returns (threshold, [(heads removed, channels removed) per layer])."""
    z, cost, owner = [], [], []
    for i, (s, c, rep) in enumerate(zip(scores, costs, reps)):
        z += [s.heads, s.channels]
        cost += [
            torch.full_like(s.heads, c["head"] + c["kv_head"] / rep),
            torch.full_like(s.channels, float(c["channel"])),
        ]
        owner += [torch.full((len(s.heads),), 2 * i), torch.full((len(s.channels),), 2 * i + 1)]
    z, cost, owner = torch.cat(z), torch.cat(cost), torch.cat(owner)
    order = torch.argsort(z, stable=True)
    removed = torch.cat([cost.new_zeros(1), cost[order].cumsum(0)])  # after removing k units
    k = int(torch.argmin((removed - target).abs()))
    counts = torch.bincount(owner[order[:k]], minlength=2 * len(scores)).view(-1, 2)
    threshold = float(z[order[k - 1]]) if k else float("-inf")
    return threshold, [tuple(c) for c in counts.tolist()]


def new_bias_params(adapter, layer, bias: bool) -> int:
    """Params compensation will add to this layer: a bias for o_proj / down_proj lacking one."""
    return sum(
        m.out_features
        for m in (adapter.o_proj(layer), adapter.down_proj(layer))
        if bias and m.bias is None
    )


def _with_bias(linear: nn.Linear) -> nn.Linear:
    """`linear` itself if it has a bias, else an nn.Linear sharing its weight with a zero
    bias (built on meta first: no throwaway initialisation of a large weight)."""
    if linear.bias is not None:
        return linear
    new = nn.Linear(linear.in_features, linear.out_features, bias=True, device="meta")
    new.weight = linear.weight
    new.bias = nn.Parameter(
        torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
    )
    return new


@torch.no_grad()
def compensate(adapter, layer, lp: LayerPlan, means: dict, bias: bool = True) -> None:
    """FLAP eq. 8: fold the removed input channels' mean contribution into the bias of
    o_proj / down_proj, then zero their columns (the masked model equals the sliced one)."""
    nh, _, ffn = adapter.layer_shape(layer)
    drop_heads, drop_channels = lp.removed(nh, ffn)
    drop = {
        "o": head_rows(drop_heads, adapter.head_dim),
        "down": torch.as_tensor(drop_channels, dtype=torch.long),
    }
    for role, cols in drop.items():
        if bias and len(cols):
            linear = _with_bias(adapter.linear(layer, role))
            w = linear.weight
            shift = w[:, cols.to(w.device)].double() @ means[role][cols].to(w.device)
            linear.bias += shift.to(linear.bias.dtype)
            adapter.set_linear(layer, role, linear)
    mask_layer(adapter, layer, lp)


def prune(model, tokens: torch.Tensor, cfg: FlapConfig, adapter=None) -> PruningPlan:
    """FLAP: dense statistics pass, global threshold, per-layer GQA selection, bias
    compensation. The model is changed in place (columns zeroed, biases added)."""
    adapter = adapter or get_adapter(model)
    scores, means = [], []

    def collect(work: LayerWork) -> None:  # statistics only: the pass stays dense
        o, down = adapter.o_proj(work.layer), adapter.down_proj(work.layer)
        stats = input_stats(work, {"o": o, "down": down})
        scores.append(
            standardized_units(
                adapter,
                work.layer,
                fluctuation_columns(o.weight, stats["o"]),
                fluctuation_columns(down.weight, stats["down"]),
            )
        )
        means.append({k: s.mean().cpu() for k, s in stats.items()})

    timer = run_sequential(model, adapter, tokens, collect, desc="flap", **cfg.driver())
    layers = adapter.layers()
    costs = [adapter.unit_costs(layer) for layer in layers]
    reps = [nh // nkv for nh, nkv, _ in map(adapter.layer_shape, layers)]
    sizes = [adapter.layer_params(layer) for layer in layers]
    # the biases compensation creates count as kept params: remove that much more
    extra = [new_bias_params(adapter, layer, cfg.bias_compensation) for layer in layers]
    target = cfg.ratio * sum(sizes) + sum(extra)
    threshold, counts = global_threshold(scores, costs, reps, target)
    attn = [n * (c["head"] + c["kv_head"] / rep) for (n, _), c, rep in zip(counts, costs, reps)]
    ffn = [n * c["channel"] for (_, n), c in zip(counts, costs)]
    # the threshold moves in whole units (a head is thousands of params): what it misses
    # goes to the FFN of the first layer through the carry, so the total hits the ratio
    budget, plans = Budget(carry=target - sum(attn) - sum(ffn)), []
    for i, layer in enumerate(layers):
        lp = budget.plan(scores[i], costs[i], attn[i], attn[i] + ffn[i])
        before = adapter.layer_params(layer)
        compensate(adapter, layer, lp, means[i], cfg.bias_compensation)
        budget.carry -= extra[i] - (adapter.layer_params(layer) - before)  # bias not created
        plans.append(lp)
    return finish(
        plans,
        "flap",
        cfg,
        adapter,
        budget,
        sizes=sizes,
        schedule="adaptive (global threshold)",
        threshold=threshold,
        threshold_units_removed=counts,
        phase_seconds=timer.seconds,
    )
