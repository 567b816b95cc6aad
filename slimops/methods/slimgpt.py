"""SlimGPT (Ling et al., NeurIPS 2024): layer-wise structured OBS pruning.

Per decoder layer, in order (inputs come from the already pruned layers before it):
  1. heads: H = E[x x^T] of o_proj's input. Batched Greedy Pruning: score every removable
     unit at once from the Cholesky of its block of H^-1, remove the cheapest by error per
     parameter, OBS-compensate o_proj's kept columns, downdate H^-1, rescore, repeat.
     Under GQA the units are a whole KV group (its query heads + k/v head) or one query head
     from every group (the joint error of that set), so the result is always valid GQA.
  2. FFN: H of down_proj's input, recomputed after step 1. Dynamic Group Size: remove the
     lowest-error channels in groups that halve as the remaining count shrinks (large groups
     first for speed, small groups last for accuracy), compensating down_proj each time.
  3. Incremental Pruning Ratio: per-layer ratios from `schedules.layer_ratios`; rounding to
     whole heads/channels is carried into the next layer so the total hits the target.
With `align=N` (methods/align.py) attention loses whole KV groups only, the FFN absorbs the
rest of the layer's target at a kept width that is a multiple of N, and per-layer ratios are
capped at what such a layer can lose.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..kernels.hessian import reference as hessian_reference
from ..models import get_adapter
from ..plan import LayerPlan, PruningPlan
from ..schedules import layer_ratios
from ..sequential import LayerWork, run_sequential
from ..slicing import head_rows
from .align import aligned_ratios, aligned_removal, check_align, kept_widths
from .common import Budget, PruneConfig, channels_to_remove, finish, layer_targets, remove_heads
from .obs_solver import ObsSolver, damp_hessian
from .slimgpt_reference import ReferenceSolver


@dataclass
class SlimGPTConfig(PruneConfig):
    schedule: str | list = "log"            # log | linear | uniform | explicit per-layer list
    percdamp: float = 0.01                  # damping, fraction of mean diag(H)
    min_group: int = 8                      # smallest FFN group of Dynamic Group Size
    reference: bool = False                 # the slow paper-faithful solver (tests, benchmarks)
    align: int | None = None                # FFN widths multiple of N, whole KV groups only
                                            # (None or 1: off; CLI default: align.default_align)
    whole_kv_groups: bool = True            # with align: False aligns the FFN only (heads
                                            # pruned as unaligned; see align.py's numbers)

    def __post_init__(self):
        super().__post_init__()
        self.align = check_align(self.align)
        if not 0.0 <= self.percdamp:
            raise ValueError(f"percdamp {self.percdamp} must be >= 0")


class ObsScorer:
    """Head scores for common.remove_heads: the OBS error of removing a set of heads' o_proj
    input columns, from the solver's current Hinv (rescored after every removal)."""

    def __init__(self, solver, head_dim: int):
        self.solver, self.head_dim, self.device = solver, head_dim, solver.W.device

    def _columns(self, heads: list[int]) -> torch.Tensor:
        return head_rows(heads, self.head_dim, self.device)

    def group_scores(self, groups):
        cols = torch.stack([self._columns(hs) for hs in groups.values()])
        return self.solver.errors(cols).tolist()

    def head_scores(self, heads):
        return self.solver.errors(torch.stack([self._columns([h]) for h in heads])).tolist()

    def joint_score(self, heads):
        return float(self.solver.errors(self._columns(heads)[None])[0])

    def remove(self, heads):
        self.solver.remove(self._columns(heads))


def prune_heads(solver, num_heads: int, num_kv: int, head_dim: int, costs: dict,
                target: float, whole_groups: bool = False) -> tuple[list[int], list[int], int]:
    """Batched Greedy Pruning under GQA: common.remove_heads scored by OBS errors, each
    removal compensating o_proj and downdating Hinv. Kept heads, kept KV heads, removed."""
    return remove_heads(ObsScorer(solver, head_dim), num_heads, num_kv, costs, target,
                        whole_groups)


def prune_channels(solver, n_remove: int, min_group: int) -> list[int]:
    """Dynamic Group Size: remove n_remove lowest-error channels in halving groups."""
    done = 0
    while done < n_remove:
        left = n_remove - done
        size = left if left <= min_group else max(min_group, left // 2)
        idx = torch.topk(solver.channel_errors(), size, largest=False).indices
        solver.remove(idx.sort().values)
        done += size
    return solver.alive.nonzero().squeeze(1).tolist()


def _solver(cfg: SlimGPTConfig, W: torch.Tensor, H: torch.Tensor, damping: list):
    H, damped = damp_hessian(H, W, cfg.percdamp)
    damping.append(damped)
    if cfg.reference:
        return ReferenceSolver(W, H)
    return ObsSolver(W, H)


@torch.no_grad()
def prune_layer(work: LayerWork, cfg: SlimGPTConfig, ratio: float, budget: Budget,
                damping: list) -> LayerPlan:
    adapter, layer = work.adapter, work.layer
    nh, nkv, ffn = adapter.layer_shape(layer)
    costs = adapter.unit_costs(layer)
    attn_goal, layer_goal = layer_targets(adapter, layer, ratio)
    target = budget.open(layer_goal)

    o_proj = adapter.o_proj(layer)
    H = work.hessians({"o_proj": o_proj})["o_proj"]
    with work.timer("obs", work.device):
        W = o_proj.weight.float().clone()
        solver = _solver(cfg, W, H, damping)
        attn_target = min(attn_goal, target)
        if cfg.align:  # attention takes at least what the aligned FFN cannot
            ffn_max = (ffn - min(kept_widths(ffn, cfg.align))) * costs["channel"]
            attn_target = min(max(attn_target, target - ffn_max), target)
        heads, kv, removed = prune_heads(solver, nh, nkv, adapter.head_dim, costs, attn_target,
                                         whole_groups=bool(cfg.align) and cfg.whole_kv_groups)
        o_proj.weight.copy_(solver.W)

    down = adapter.down_proj(layer)
    H = work.hessians({"down_proj": down})["down_proj"]
    with work.timer("obs", work.device):
        W = down.weight.float().clone()
        solver = _solver(cfg, W, H, damping)
        if cfg.align:  # nearest kept width that is a multiple of align (carry included)
            n_remove = aligned_removal(ffn, (target - removed) / costs["channel"], cfg.align)
        else:
            n_remove = channels_to_remove(target - removed, costs["channel"], ffn)
        channels = prune_channels(solver, n_remove, cfg.min_group)
        down.weight.copy_(solver.W)
    budget.close(target, removed + n_remove * costs["channel"])
    return LayerPlan(heads, kv, channels)


def prune(model, tokens: torch.Tensor, cfg: SlimGPTConfig, adapter=None) -> PruningPlan:
    """Prune `model` in place (masked + compensated; slice with slicing.apply_plan)."""
    adapter = adapter or get_adapter(model)
    ratios = layer_ratios(cfg.schedule, cfg.ratio, len(adapter.layers()))
    align_info = {}
    if cfg.align:      # before any work: cap layers at what whole groups + N-multiples allow
        ratios, align_info = aligned_ratios(adapter, ratios, cfg.align, cfg.whole_kv_groups)
    budget, damping, plans = Budget(), [], []
    accumulate, batch_size = ops.hessian_accumulate, cfg.batch_size
    if cfg.reference:   # as the authors' (SparseGPT-derived) code: one sequence per forward,
        accumulate, batch_size = hessian_reference.hessian_accumulate, 1   # fp32 addmm into H
    timer = run_sequential(model, adapter, tokens, lambda w: plans.append(
        prune_layer(w, cfg, ratios[w.index], budget, damping)), device=cfg.device,
        batch_size=batch_size, desc="slimgpt" + (" (reference)" if cfg.reference else ""),
        accumulate=accumulate)
    return finish(plans, "slimgpt", cfg, adapter, budget, schedule=cfg.schedule,
                  layer_ratios=ratios, percdamp=cfg.percdamp,
                  damping_grown=sum(d.grown for d in damping), **align_info,
                  phase_seconds=timer.seconds)
