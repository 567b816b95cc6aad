"""Where SlimGPT's parameter budget goes, decided from OBS errors instead of a fixed rule.

Removing a set of o_proj input columns (heads) or down_proj input columns (FFN channels) with
OBS compensation raises that projection's output error by exactly the removal's OBS error:
the mean over calibration tokens of the squared change it adds to the residual stream. Both
projections write into the same residual stream, so their errors share one unit and can be
traded against each other. A `Curve` records (params removed, cumulative error) along the
greedy removal order of one projection; from the two curves of a layer:

* `best_split`: how many of a layer's params attention should give (split="obs"); the
  paper's rule is the same ratio for attention and FFN (split="equal");
* `layer_curve` + `allocate`: how many params each layer should give (schedule="obs"), by
  minimising the sum over layers of weight_i x error_i under the total budget and a
  per-layer cap. The weight says what a unit of squared perturbation at layer i's output
  costs at the model's output: `gradient_weights` (causal LMs) is the mean squared gradient
  of the LM loss w.r.t. that hidden state (the Fisher trace per feature: to second order a
  perturbation of energy e raises the loss by ~ e * weight / 2, so errors that later layers
  amplify count for more); `energy_weights` (encoders, no LM loss) is 1 / the hidden
  state's energy (a perturbation relative to the signal it is added to).

Curves come from the layer's current inputs; the removals themselves are redone by the
caller, so a curve only decides sizes, never which units go.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .. import distributed
from .common import Move, remove_heads
from .obs_solver import ObsScorer

FFN_CURVE_STEPS = 32  # resolution of the FFN error curve (groups of ~1/32 of the FFN)


class OutputEnergy:
    """Mean squared norm of a layer's output hidden states over the forwards run inside the
    block (a forward hook): `with OutputEnergy(layer) as e: ...; e.mean`."""

    def __init__(self, layer):
        self.layer, self.sum, self.count = layer, 0.0, 0

    def _hook(self, _module, _args, out):
        out = out[0] if isinstance(out, tuple) else out
        self.sum += float(out.double().pow(2).sum())
        self.count += out.shape[:-1].numel()

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def mean(self) -> float:
        """Over every rank's tokens under torch.distributed."""
        return distributed.all_sum_float(self.sum) / max(distributed.all_sum_float(self.count), 1)


def energy_weights(energies: list[float]) -> list[float]:
    return [1.0 / max(e, 1e-30) for e in energies]


def layer_weights(
    model, adapter, tokens, energies, how="gradient", batch_size=8, device="cpu"
) -> list[float]:
    """What an error in each layer costs at the output: gradient (Fisher) weights for causal
    LMs unless how="energy", else 1 / the layer's output energy (encoders have no loss)."""
    if adapter.causal_lm and how == "gradient":
        return gradient_weights(model, adapter, tokens, batch_size, device)
    return energy_weights(energies)


def gradient_weights(
    model, adapter, tokens: torch.Tensor, batch_size: int = 8, device="cpu"
) -> list[float]:
    """Per layer: mean over tokens of ||d(sum of token NLLs) / d h_i||^2 / hidden size, h_i
    the layer's output, from one forward and backward of the dense model (no weight grads:
    the graph is rooted at the embeddings' output). The model's device and flags are
    restored."""
    layers = adapter.layers()
    sums = torch.zeros(len(layers), dtype=torch.float64)
    home = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}

    def hook_for(i):
        def hook(_module, _args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            hidden.register_hook(
                lambda g: sums.__setitem__(i, sums[i] + g.double().pow(2).sum().cpu())
            )

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    handles.append(
        model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_())
    )
    count = 0
    try:
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size].to(device)
                out = model(input_ids=batch, labels=batch, use_cache=False)
                n = batch[:, 1:].numel()
                (out.loss * n).backward()
                count += batch.numel()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.to(home)
    sums, count = distributed.all_sum(sums), distributed.all_sum_float(count)
    return (sums / count / adapter.hidden_size).tolist()


@dataclass
class Curve:
    params: list[float]  # cumulative params removed, increasing, starting at 0
    errors: list[float]  # cumulative OBS error at each point

    def at(self, p: float) -> float:
        """Error after removing p params (linear between points; inf past the last)."""
        if p <= 0:
            return 0.0
        i = bisect.bisect_left(self.params, p)
        if i == len(self.params):
            return float("inf")
        p0, p1 = self.params[i - 1], self.params[i]
        e0, e1 = self.errors[i - 1], self.errors[i]
        return e1 if p1 == p0 else e0 + (e1 - e0) * (p - p0) / (p1 - p0)

    @property
    def max_params(self) -> float:
        return self.params[-1]


def _cumulative(steps: list[tuple[float, float]]) -> Curve:
    params, errors = [0.0], [0.0]
    for cost, err in steps:
        params.append(params[-1] + cost)
        errors.append(errors[-1] + max(err, 0.0))
    return Curve(params, errors)


@dataclass
class LayerCurves:
    heads: Curve  # after each GQA move of the greedy head pruning
    ffn: Curve  # after each FFN group
    moves: list[Move]  # the head moves, in order (moves[:k] reach heads.params[k])

    def widths_after(self, k: int, num_kv: int, rep: int) -> tuple[int, int]:
        """(kept KV groups, query heads per group) after the first k head moves."""
        groups = sum(m.group is not None for m in self.moves[:k])
        return num_kv - groups, rep - (k - groups)


def head_curve(
    scorer, num_heads: int, num_kv: int, costs: dict, whole_groups: bool = False
) -> tuple[Curve, list[Move]]:
    """Every GQA move the greedy head pruning would take, to one head left (mutates the
    scorer's solver: pass a copy)."""
    moves: list[Move] = []
    remove_heads(scorer, num_heads, num_kv, costs, float("inf"), whole_groups, history=moves)
    return _cumulative([(m.cost, m.score) for m in moves]), moves


def layer_curves(
    adapter, layer, head_solver, down_solver, whole_groups: bool = False
) -> LayerCurves:
    """Both curves of one layer from its o_proj and down_proj solvers (both are used up)."""
    nh, nkv, _ = adapter.layer_shape(layer)
    costs = adapter.unit_costs(layer)
    heads, moves = head_curve(
        ObsScorer(head_solver, adapter.head_dim), nh, nkv, costs, whole_groups
    )
    return LayerCurves(heads, ffn_curve(down_solver, costs["channel"], FFN_CURVE_STEPS), moves)


def ffn_curve(solver, channel_cost: int, steps: int = 32, keep: int = 1) -> Curve:
    """Channels removed in `steps` equal groups (lowest single-channel errors first), each
    group's exact joint OBS error recorded (mutates the solver: pass a copy)."""
    ffn = solver.W.shape[1]
    size = max(1, (ffn - keep) // steps)
    points = []
    while int(solver.alive.sum()) - keep >= 1:
        n = min(size, int(solver.alive.sum()) - keep)
        idx = torch.topk(solver.channel_errors(), n, largest=False).indices.sort().values
        err = float(solver.errors(idx[None])[0])
        solver.remove(idx)
        points.append((n * channel_cost, err))
    return _cumulative(points)


def best_split(heads: Curve, ffn: Curve, target: float) -> float:
    """Attention params to remove (a point of the head curve, never above target) so that
    heads + FFN remove `target` params at the least total error."""
    best, best_err = 0.0, float("inf")
    for p, e in zip(heads.params, heads.errors):
        if p > target:
            break
        total = e + ffn.at(target - p)
        if total < best_err:
            best, best_err = p, total
    if best_err == float("inf"):  # FFN cannot absorb: take as much attention as fits
        best = max(p for p in heads.params if p <= target)
    return best


def layer_curve(heads: Curve, ffn: Curve, points: int = 64) -> Curve:
    """The layer's least error for removing p params, on a grid of `points`."""
    top = heads.max_params + ffn.max_params
    grid = [top * i / points for i in range(points + 1)]
    errors = []
    for p in grid:
        errors.append(
            min(
                (e + ffn.at(p - a) for a, e in zip(heads.params, heads.errors) if a <= p),
                default=float("inf"),
            )
        )
    return Curve(grid, errors)


def allocate(
    curves: list[Curve], sizes: list[int], weights: list[float], total: float, cap: float
) -> list[float]:
    """Per-layer ratios minimising sum_i weights_i * curve_i(p_i) with sum p_i = total and
    p_i <= cap * size_i: each layer takes the p maximising lam * p - w_i * C_i(p) on its grid,
    and lam is bisected until the layers remove `total` (the caller's rounding carry absorbs
    what the grid leaves)."""
    if total > sum(cap * size for size in sizes) + 1e-9:
        raise ValueError(
            f"the layers can lose at most {cap:.0%} each: ratio too high for the per-layer cap"
        )

    def take(lam: float) -> list[float]:
        out = []
        for curve, size, w in zip(curves, sizes, weights):
            options = [
                (lam * p - w * e, -p, p)
                for p, e in zip(curve.params, curve.errors)
                if p <= cap * size and e < float("inf")
            ]
            out.append(max(options)[2])
        return out

    lo, hi = 0.0, 1.0
    while sum(take(hi)) < total and hi < 1e30:
        hi *= 4.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(take(mid)) < total else (lo, mid)
    chosen = take(hi)
    scale = total / max(sum(chosen), 1e-12)  # land on the total exactly
    return [min(cap, p * scale / size) for p, size in zip(chosen, sizes)]


def layer_ratios_from_curves(
    model,
    adapter,
    tokens: torch.Tensor,
    curves: list[tuple[Curve, Curve]],
    energies: list[float],
    sizes: list[int],
    cfg,
    how: str = "gradient",
) -> list[float]:
    """The one cross-layer OBS allocation (slimgpt's schedule "obs" and search's seed): each
    layer's (heads, FFN) curves merged into its least-error curve, weighted by what an error
    there costs at the output (`layer_weights` on the first cfg.gradient_samples windows of
    all ranks, tokens[:n] of one process), then `allocate` under cfg.ratio of the layers'
    `sizes` and cfg.max_layer_ratio."""
    weights = layer_weights(
        model,
        adapter,
        distributed.first_rows(tokens, cfg.gradient_samples),
        energies,
        how,
        cfg.batch_size,
        cfg.device,
    )
    lines = [layer_curve(heads, ffn) for heads, ffn in curves]
    return allocate(lines, sizes, weights, cfg.ratio * sum(sizes), cfg.max_layer_ratio)
