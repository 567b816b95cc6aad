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

from dataclasses import dataclass, field

import torch

from .. import ops
from ..plan import LayerPlan, PruningPlan
from ..schedules import layer_ratios
from ..sequential import LayerWork, run_sequential
from .align import aligned_ratios, aligned_removal, check_align, kept_widths
from .obs_solver import ObsSolver, damp_hessian


@dataclass
class SlimGPTConfig:
    ratio: float = 0.2                      # share of decoder-layer parameters to remove
    schedule: str | list = "log"            # log | linear | uniform | explicit per-layer list
    percdamp: float = 0.01                  # damping, fraction of mean diag(H)
    min_group: int = 8                      # smallest FFN group of Dynamic Group Size
    batch_size: int = 8                     # calibration sequences per forward
    device: str = "cpu"
    reference: bool = False                 # the slow paper-faithful solver (tests, benchmarks)
    align: int | None = None                # FFN widths multiple of N, whole KV groups only
                                            # (None or 1: off; CLI default: align.default_align)
    whole_kv_groups: bool = True            # with align: False aligns the FFN only (heads
                                            # pruned as unaligned; see align.py's numbers)


@dataclass
class _Budget:
    ratios: list
    carry: float = 0.0                      # params still owed by earlier layers (rounding)
    damping: list = field(default_factory=list)


def head_columns(heads: list[int], head_dim: int, device) -> torch.Tensor:
    h = torch.as_tensor(heads, dtype=torch.long, device=device)
    return (h[:, None] * head_dim + torch.arange(head_dim, device=device)).reshape(-1)


def prune_heads(solver, num_heads: int, num_kv: int, head_dim: int, costs: dict,
                target: float, whole_groups: bool = False) -> tuple[list[int], list[int], int]:
    """Greedy GQA-preserving head removal until `target` params are removed (never
    overshooting by more than half a unit); `whole_groups` allows only whole KV groups.
    Returns kept heads, kept KV heads, removed."""
    rep = num_heads // num_kv
    alive = {g: list(range(g * rep, (g + 1) * rep)) for g in range(num_kv)}
    removed = 0
    dev = solver.W.device
    while True:
        groups, per = list(alive), len(next(iter(alive.values())))
        cands = []                               # (error, cost, heads, groups dropped)
        if len(groups) > 1:                      # a whole KV group
            cols = torch.stack([head_columns(alive[g], head_dim, dev) for g in groups])
            err = solver.errors(cols)
            g = int(torch.argmin(err))
            cands.append((float(err[g]), per * costs["head"] + costs["kv_head"],
                          alive[groups[g]], [groups[g]]))
        if per > 1 and not whole_groups:         # one query head from every group
            heads = [h for g in groups for h in alive[g]]
            err = solver.errors(torch.stack([head_columns([h], head_dim, dev) for h in heads]))
            err = err.view(len(groups), per)
            chosen = [alive[g][int(torch.argmin(err[i]))] for i, g in enumerate(groups)]
            joint = solver.errors(head_columns(chosen, head_dim, dev)[None])
            cands.append((float(joint[0]), len(groups) * costs["head"], chosen, []))
        cands = [c for c in cands if removed + c[1] / 2 <= target]
        if not cands:
            break
        err, cost, heads, dropped = min(cands, key=lambda c: c[0] / c[1])
        solver.remove(head_columns(heads, head_dim, dev))
        for g in list(alive):
            alive[g] = [h for h in alive[g] if h not in heads]
            if g in dropped:
                del alive[g]
        removed += cost
    kept = sorted(h for g in alive for h in alive[g])
    return kept, sorted(alive), removed


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


def _solver(cfg: SlimGPTConfig, W: torch.Tensor, H: torch.Tensor, budget: _Budget):
    H, damping = damp_hessian(H, W, cfg.percdamp)
    budget.damping.append(damping)
    if cfg.reference:
        from .slimgpt_reference import ReferenceSolver
        return ReferenceSolver(W, H)
    return ObsSolver(W, H)


@torch.no_grad()
def prune_layer(work: LayerWork, cfg: SlimGPTConfig, budget: _Budget) -> LayerPlan:
    adapter, layer = work.adapter, work.layer
    align = check_align(cfg.align)
    nh, nkv, ffn = adapter.layer_shape(layer)
    costs = adapter.unit_costs(layer)
    ratio = budget.ratios[work.index]
    target = ratio * adapter.layer_params(layer) + budget.carry

    o_proj = adapter.o_proj(layer)
    H = work.hessians({"o_proj": o_proj})["o_proj"]
    with work.timer("obs", work.device):
        W = o_proj.weight.float().clone()
        solver = _solver(cfg, W, H, budget)
        attn_target = min(ratio * (nh * costs["head"] + nkv * costs["kv_head"]), target)
        if align:      # attention takes at least what the aligned FFN cannot
            ffn_max = (ffn - min(kept_widths(ffn, align))) * costs["channel"]
            attn_target = min(max(attn_target, target - ffn_max), target)
        heads, kv, removed = prune_heads(solver, nh, nkv, adapter.head_dim, costs, attn_target,
                                         whole_groups=bool(align) and cfg.whole_kv_groups)
        o_proj.weight.copy_(solver.W)

    down = adapter.down_proj(layer)
    H = work.hessians({"down_proj": down})["down_proj"]
    with work.timer("obs", work.device):
        W = down.weight.float().clone()
        solver = _solver(cfg, W, H, budget)
        if align:      # nearest kept width that is a multiple of align (carry included)
            n_remove = aligned_removal(ffn, (target - removed) / costs["channel"], align)
        else:
            n_remove = int(round((target - removed) / costs["channel"]))
            n_remove = max(0, min(ffn - 1, n_remove))
        channels = prune_channels(solver, n_remove, cfg.min_group)
        down.weight.copy_(solver.W)
    budget.carry = target - removed - n_remove * costs["channel"]
    return LayerPlan(heads, kv, channels)


def prune(model, tokens: torch.Tensor, cfg: SlimGPTConfig, adapter=None) -> PruningPlan:
    """Prune `model` in place (masked + compensated; slice with slicing.apply_plan)."""
    from ..models import get_adapter
    align = check_align(cfg.align)
    adapter = adapter or get_adapter(model)
    ratios = layer_ratios(cfg.schedule, cfg.ratio, len(adapter.layers()))
    align_info = {}
    if align:          # before any work: cap layers at what whole groups + N-multiples allow
        ratios, align_info = aligned_ratios(adapter, ratios, align, cfg.whole_kv_groups)
    budget = _Budget(ratios)
    plans: list[LayerPlan] = []
    accumulate, batch_size = ops.hessian_accumulate, cfg.batch_size
    if cfg.reference:   # as the authors' (SparseGPT-derived) code: one sequence per forward,
        from slimops.kernels.hessian.reference import hessian_accumulate as accumulate
        batch_size = 1  # fp32 addmm of its activations into H
    timer = run_sequential(model, adapter, tokens, lambda w: plans.append(
        prune_layer(w, cfg, budget)), device=cfg.device, batch_size=batch_size,
        desc="slimgpt" + (" (reference)" if cfg.reference else ""), accumulate=accumulate)
    info = {"schedule": cfg.schedule, "layer_ratios": ratios, "percdamp": cfg.percdamp,
            "damping_grown": sum(d.grown for d in budget.damping), **align_info,
            "phase_seconds": timer.seconds}
    return PruningPlan(plans, method="slimgpt", target_ratio=cfg.ratio, info=info)
