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
How a layer's budget splits between heads and FFN, and (schedule="obs") how much each layer
loses, can come from OBS error curves instead of the paper's fixed rules (allocation.py).
With `align=N` (methods/align.py) attention loses whole KV groups only, the FFN absorbs the
rest of the layer's target at a kept width that is a multiple of N, and per-layer ratios are
capped at what such a layer can lose.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch

from ... import ops
from ...kernels.hessian import reference as hessian_reference
from ...models import get_adapter
from ...plan import LayerPlan, PruningPlan
from ...schedules import layer_ratios
from ...sequential import LayerWork, run_sequential
from ..align import aligned_ratios, aligned_removal, check_align, kept_widths
from ..allocation import OutputEnergy, best_split, layer_curves, layer_ratios_from_curves
from ..common import Budget, PruneConfig, channels_to_remove, finish, remove_heads
from ..obs_solver import Damping, ObsScorer, ObsSolver, damp_hessian
from .reference import ReferenceSolver

SPLITS = ("equal", "obs")


@dataclass
class SlimGPTConfig(PruneConfig):
    schedule: str | list = "log"  # log | linear | uniform | obs | per-layer list
    # heads vs FFN in a layer: obs (least OBS error, allocation.py; the default: better than
    # equal on held-in text of both the reference model and SmolLM2, benchmarks/RESULTS.md)
    # | equal (the paper: the layer's ratio of its query heads, the FFN the rest)
    split: str = field(
        default="obs",
        metadata={"help": "heads vs FFN in a layer: obs (least OBS error) | equal (the paper)"},
    )
    max_layer_ratio: float = 0.9  # cap on any layer's ratio (schedules log, obs)
    layer_weights: str = "gradient"  # schedule obs: gradient (Fisher) | energy
    gradient_samples: int = 16  # calibration sequences for gradient weights
    percdamp: float = 0.01  # damping, fraction of mean diag(H)
    min_group: int = 8  # smallest FFN group of Dynamic Group Size
    reference: bool = False  # the slow paper-faithful solver (tests, benchmarks)
    align: int | None = None  # FFN widths multiple of N, whole KV groups only
    # (None or 1: off; CLI default: align.default_align)
    whole_kv_groups: bool = True  # with align: False aligns the FFN only (heads
    # pruned as unaligned; see align.py's numbers)

    def __post_init__(self):
        super().__post_init__()
        self.align = check_align(self.align)
        if not 0.0 <= self.percdamp:
            raise ValueError(f"percdamp {self.percdamp} must be >= 0")
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r}: choose one of {', '.join(SPLITS)}")
        if not self.ratio < self.max_layer_ratio < 1.0:
            raise ValueError(f"max_layer_ratio {self.max_layer_ratio} must lie in (ratio, 1)")

    def streams(self) -> bool:  # schedule obs measures every layer's error curve first
        return self.schedule != "obs"


def prune_heads(
    solver,
    num_heads: int,
    num_kv: int,
    head_dim: int,
    costs: dict,
    target: float,
    whole_groups: bool = False,
) -> tuple[list[int], list[int], int]:
    """Batched Greedy Pruning under GQA: common.remove_heads scored by OBS errors, each
    removal compensating o_proj and downdating Hinv. Kept heads, kept KV heads, removed."""
    return remove_heads(ObsScorer(solver, head_dim), num_heads, num_kv, costs, target, whole_groups)


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


def _curves(cfg: SlimGPTConfig, adapter, layer, head_solver, H_down: torch.Tensor, costs):
    """(head curve, FFN curve) of one layer from copies of its solvers (allocation.py)."""
    down = _solver(cfg, adapter.down_proj(layer).weight.float().clone(), H_down, [])
    c = layer_curves(
        adapter,
        layer,
        copy.deepcopy(head_solver),
        down,
        whole_groups=bool(cfg.align) and cfg.whole_kv_groups,
    )
    return c.heads, c.ffn


def _attention_target(cfg, adapter, layer, solver, H_down, costs, ratio, target):
    """(target, in_heads, overshoot) for common.remove_heads: the layer's ratio of its query
    heads (the paper's equal split, rounded to the nearest GQA move), or the least-error
    split in params; at least what the FFN cannot absorb (then whole moves until reached)."""
    nh, _, ffn = adapter.layer_shape(layer)
    if cfg.split == "obs":
        heads, curve = _curves(cfg, adapter, layer, solver, H_down, costs)
        attn_target = best_split(heads, curve, target)
    else:
        attn_target = min(ratio * nh * costs["head"], target)
    narrowest = min(kept_widths(ffn, cfg.align)) if cfg.align else 1
    forced = target - (ffn - narrowest) * costs["channel"]  # beyond the FFN's reach
    if attn_target < forced:
        return forced, False, 1.0
    if cfg.split == "obs" or cfg.align:  # whole moves in params
        return attn_target, False, 0.0 if cfg.split == "obs" else 0.5
    # in query heads; an MHA head move also frees its k/v rows, counted in params below
    return attn_target / costs["head"], True, 0.5


@torch.no_grad()
def prune_layer(
    work: LayerWork, cfg: SlimGPTConfig, ratio: float, budget: Budget, damping: list
) -> LayerPlan:
    adapter, layer = work.adapter, work.layer
    nh, nkv, ffn = adapter.layer_shape(layer)
    costs = adapter.unit_costs(layer)
    target = budget.open(ratio * adapter.layer_params(layer))

    o_proj, down = adapter.o_proj(layer), adapter.down_proj(layer)
    # split="obs" also needs down_proj's Hessian before the heads go: same forward pass
    H = work.hessians(
        {"o_proj": o_proj, "down_proj": down} if cfg.split == "obs" else {"o_proj": o_proj}
    )
    with work.timer("obs", work.device):
        W = o_proj.weight.float().clone()
        solver = _solver(cfg, W, H["o_proj"], damping)
        # (the least-error split lands on a move boundary: overshoot 0 replays those moves)
        attn_target, in_heads, overshoot = _attention_target(
            cfg, adapter, layer, solver, H.get("down_proj"), costs, ratio, target
        )
        heads, kv, removed = remove_heads(
            ObsScorer(solver, adapter.head_dim),
            nh,
            nkv,
            costs,
            attn_target,
            whole_groups=bool(cfg.align) and cfg.whole_kv_groups,
            overshoot=overshoot,
            in_heads=in_heads,
        )
        o_proj.weight.copy_(solver.W)

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
    work.plan = LayerPlan(heads, kv, channels)  # for a layer source that slices as it goes
    return work.plan


@torch.no_grad()
def obs_schedule(model, adapter, tokens: torch.Tensor, cfg: SlimGPTConfig) -> list[float]:
    """Per-layer ratios from one pass over the DENSE model (allocation.allocate): each
    layer's least-error curve, weighted by what an error there costs at the output
    (gradient weights for causal LMs, 1 / hidden-state energy for encoders)."""
    curves, energies = [], []

    def collect(work: LayerWork) -> None:
        layer = work.layer
        with OutputEnergy(layer) as energy:
            H = work.hessians(
                {"o_proj": adapter.o_proj(layer), "down_proj": adapter.down_proj(layer)}
            )
        with work.timer("obs", work.device):
            W = adapter.o_proj(layer).weight.float().clone()
            heads, ffn = _curves(
                cfg,
                adapter,
                layer,
                _solver(cfg, W, H["o_proj"], []),
                H["down_proj"],
                adapter.unit_costs(layer),
            )
        curves.append((heads, ffn))
        energies.append(energy.mean)

    run_sequential(model, adapter, tokens, collect, desc="slimgpt: error curves", **cfg.driver())
    sizes = [adapter.layer_params(layer) for layer in adapter.layers()]
    return layer_ratios_from_curves(
        model, adapter, tokens, curves, energies, sizes, cfg, cfg.layer_weights
    )


def _ratios(model, adapter, tokens, cfg: SlimGPTConfig) -> tuple[list[float], dict]:
    if cfg.schedule == "obs":
        ratios = obs_schedule(model, adapter, tokens, cfg)
    else:
        ratios = layer_ratios(cfg.schedule, cfg.ratio, len(adapter.layers()), cfg.max_layer_ratio)
    if cfg.align:  # before any work: cap layers at what whole groups + N-multiples allow
        return aligned_ratios(adapter, ratios, cfg.align, cfg.whole_kv_groups)
    return ratios, {}


def prune(
    model, tokens: torch.Tensor, cfg: SlimGPTConfig, adapter=None, progress=None, source=None
) -> PruningPlan:
    """Prune `model` in place (masked + compensated; slice with slicing.apply_plan).
    progress (slimops.progress.Progress): continue where a killed run stopped, and save
    this run's state after every layer. source: where the driver gets layers from
    (streaming.ShardSource: one layer in memory at a time, sliced and written out)."""
    adapter = adapter or get_adapter(model)
    state = progress.state if progress is not None else {}
    if "ratios" in state:  # resumed: the schedule (the obs one costs a pass) is known
        ratios, align_info = state["ratios"], state["align_info"]
    else:
        ratios, align_info = _ratios(model, adapter, tokens, cfg)
    budget = Budget(state.get("carry", 0.0), state.get("removed", []))
    damping = [Damping(**d) for d in state.get("damping", [])]
    plans = [LayerPlan(**lp) for lp in state.get("plans", [])]
    if source is not None:
        source.plans = plans  # resumed layers are sliced by their saved plans
    if progress is not None:
        progress.state_fn = lambda: {
            "ratios": ratios,
            "align_info": align_info,
            "carry": budget.carry,
            "removed": budget.removed,
            "damping": [asdict(d) for d in damping],
            "plans": [asdict(lp) for lp in plans],
        }
    accumulate, batch_size = ops.hessian_accumulate, cfg.batch_size
    if cfg.reference:  # as the authors' (SparseGPT-derived) code: one sequence per forward,
        accumulate, batch_size = hessian_reference.hessian_accumulate, 1  # fp32 addmm into H
    timer = run_sequential(
        model,
        adapter,
        tokens,
        lambda w: plans.append(prune_layer(w, cfg, ratios[w.index], budget, damping)),
        device=cfg.device,
        batch_size=batch_size,
        desc="slimgpt" + (" (reference)" if cfg.reference else ""),
        accumulate=accumulate,
        offload=cfg.offload,
        progress=progress,
        source=source,
    )
    return finish(
        plans,
        "slimgpt",
        cfg,
        adapter,
        budget,
        schedule=cfg.schedule,
        split=cfg.split,
        layer_ratios=ratios,
        percdamp=cfg.percdamp,
        damping_grown=sum(d.grown for d in damping),
        **align_info,
        phase_seconds=timer.seconds,
    )
