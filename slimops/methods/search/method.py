"""Search for Efficient LLMs (Shen et al., NeurIPS 2024): salient-weight inheritance,
evolutionary search over per-layer widths under a budget, then reformation.

1. Saliency (saliency.py): one pass over the dense model scores every head, KV group and FFN
   channel by second-order saliency. The initial sub-network keeps the most salient units
   at the INHERITING RATIO gamma: the share of each block's units kept, the same in every
   layer (query heads per KV group, and FFN channels; GQA groups are all kept unless MHA),
   chosen as the gamma whose sub-network meets the budget (or `inherit` when given). With
   `seed_allocation` (not in the paper) a second seed takes its per-layer widths from
   slimgpt's OBS-error allocation (allocation.py) on the same pass's Hessians; the initial
   population is both seeds and mutations of them.
2. Evolution (space.py): a population of GQA-valid candidates, each repaired into the
   budget (`ratio` of decoder params, or of MACs per token with budget="macs") by moving FFN
   width between layers. Every generation keeps the `elites` best, breeds `mutations`
   children of random top-`parents` candidates (per-gene width mutation and the paper's mask
   mutation, Alg. 1: a redrawn kept set overlapping the old one by >= alpha) and
   `crossovers` layer-wise uniform crossovers. Seeded: same seed, same result.
3. Fitness (fitness.py): perplexity of held-in calibration windows, or KL to the dense
   model, run on the dense weights through slice_gemm with prefix reuse; by default with the
   kept o/down columns refit by least squares first (`compensate`), so the search ranks
   candidates by what reformation will make of them.
4. Reformation (reformation.py) of the winner, layer by layer on all calibration tokens:
   closed-form OBS (default) or the paper's ADMM.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ... import distributed
from ...models import get_adapter
from ...plan import PruningPlan
from .. import allocation
from ..align import check_align
from ..common import PruneConfig, channels_to_remove
from ..obs_solver import ObsSolver
from ..saliency import dense_pass
from .fitness import Compensator, Evaluator
from .reformation import REFORMATIONS, reform
from .space import Space

FITNESS = ("ppl", "kl")
BUDGETS = ("params", "macs")


@dataclass
class SearchConfig(PruneConfig):
    schedule: None = None  # search chooses per-layer widths itself
    budget: str = field(default="params", metadata={"help": "params | macs (per token)"})
    generations: int = field(default=12, metadata={"help": "evolution generations"})
    population: int = field(default=24, metadata={"help": "candidates per generation"})
    parents: int = 8  # top-k candidates that breed
    mutations: int = 12  # mutated children per generation
    crossovers: int = 6  # crossover children per generation (rest: elites)
    fitness: str = field(default="ppl", metadata={"help": "ppl | kl (to the dense model)"})
    fitness_samples: int = 8  # calibration windows held in for fitness
    fresh_batches: bool = False  # draw new fitness windows every generation
    compensate: bool = True  # refit o/down kept columns inside fitness
    reformation: str = "obs"  # obs | admm | none, applied to the winner
    admm_rho: float = 1.0
    admm_iters: int = 30
    search_depth: bool = field(default=False, metadata={"help": "also drop whole layers"})
    inherit: float | None = None  # inheriting ratio gamma (None: the one meeting budget)
    alpha: float = 0.8  # Alg. 1 overlap of a redrawn mask with the old one
    p_width: float = 0.3  # per-layer width mutation probability
    p_mask: float = 0.1  # per-layer mask (Alg. 1) mutation probability
    p_depth: float = 0.05  # per-layer drop / restore probability (search_depth)
    seed_allocation: bool = True  # also seed with slimgpt's OBS-error allocation widths
    # the allocation seed's knobs, as slimgpt's: sequences for its gradient layer weights,
    # and the cap on any layer's pruning ratio
    gradient_samples: int = 16
    max_layer_ratio: float = 0.9
    seed: int = 0
    align: int | None = None  # FFN width step (None: 1/32 of the FFN)
    percdamp: float = 0.01
    cache_mb: float = 1024  # each of the two LRU caches: hidden states, refit weights

    def __post_init__(self):
        super().__post_init__()
        self.align = check_align(self.align)
        for name, value, allowed in (
            ("budget", self.budget, BUDGETS),
            ("fitness", self.fitness, FITNESS),
            ("reformation", self.reformation, REFORMATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"--{name} {value!r}: choose one of {', '.join(allowed)}")
        if self.schedule is not None:
            raise ValueError("search chooses per-layer widths itself; it takes no --schedule")
        if self.mutations + self.crossovers >= self.population or self.parents < 2:
            raise ValueError(
                "need population > mutations + crossovers (the rest are elites) and parents >= 2"
            )


def _windows(tokens: torch.Tensor, n: int, rng: random.Random) -> torch.Tensor:
    """n windows drawn over the GLOBAL sample count, this rank's share of them: every rank
    draws the same numbers whatever its shard size (a draw over the local count put the
    ranks' generators out of step when the samples did not split evenly, and the search
    diverged silently)."""
    total = distributed.global_count(tokens)
    return distributed.local_rows(tokens, sorted(rng.sample(range(total), min(n, total))), total)


def mutant(
    space: Space, parent: tuple, cfg: SearchConfig, rng: random.Random, scale: float = 1.0
) -> tuple:
    """A mutated, repaired child; the layers the mutation changed are left to it."""
    depth = cfg.p_depth if cfg.search_depth else 0.0
    child = space.mutate(
        parent, rng, scale * cfg.p_width, scale * cfg.p_mask, cfg.alpha, scale * depth
    )
    frozen = {i for i, (a, b) in enumerate(zip(parent, child)) if a != b}
    return space.repair(child, rng, frozen)


@torch.no_grad()
def allocation_seed(space: Space, model, adapter, stats, tokens, cfg: SearchConfig) -> tuple:
    """Widths from slimgpt's allocation (per-layer OBS error curves, weighted by what an
    error costs at the output, split between heads and FFN at least error) on the dense
    Hessians; units by saliency, as every gene."""
    curves, sizes, genes = [], [], []
    for i, layer in enumerate(adapter.layers()):
        o, down = adapter.o_proj(layer), adapter.down_proj(layer)
        solvers = [
            ObsSolver(w.weight.float().clone().to(cfg.device), H.to(cfg.device))
            for w, H in ((o, stats[i].H_o), (down, stats[i].H_down))
        ]
        curves.append(allocation.layer_curves(adapter, layer, *solvers))
        sizes.append(space.params(i, space.full(i)))
    energies = [st.energy for st in stats]
    pairs = [(c.heads, c.ffn) for c in curves]
    ratios = allocation.layer_ratios_from_curves(
        model, adapter, tokens, pairs, energies, sizes, cfg
    )
    for i, (c, r) in enumerate(zip(curves, ratios)):
        ls, target = space.layers[i], r * sizes[i]
        attn = allocation.best_split(c.heads, c.ffn, target)
        n_kv, per = c.widths_after(c.heads.params.index(attn), ls.dense.kv_heads, ls.dense.rep)
        cut = channels_to_remove(target - attn, ls.costs["channel"], ls.dense.ffn)
        genes.append(space.top(i, n_kv, per, ls.dense.ffn - cut))
    return tuple(genes)


def initial_population(
    space: Space, cfg: SearchConfig, rng: random.Random, seeds: tuple = ()
) -> list:
    """The salient sub-network at the inheriting ratio and any extra `seeds`, repaired into
    budget, and mutations of them (the paper's initial mutation rates: twice the later)."""
    if cfg.inherit is not None:
        gamma = cfg.inherit
    else:  # the gamma whose uniform sub-network fits
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if space.total(space.uniform(mid)) < space.target else (lo, mid)
        gamma = hi
    roots = [space.repair(space.uniform(gamma), rng)]
    roots += [space.repair(s, rng) for s in seeds]
    pop, seen = list(dict.fromkeys(roots)), set(roots)
    for n in range(20 * cfg.population):
        if len(pop) >= cfg.population:
            break
        child = mutant(space, roots[n % len(roots)], cfg, rng, scale=2.0)
        if child not in seen:
            pop.append(child)
            seen.add(child)
    return pop, gamma


def breed(space: Space, ranked: list, cfg: SearchConfig, rng: random.Random, seen: set) -> list:
    """Next generation: elites, mutated parents, crossovers of parents (no duplicates)."""
    parents = ranked[: cfg.parents]
    nxt = list(ranked[: cfg.population - cfg.mutations - cfg.crossovers])
    for kind, count in (("mutation", cfg.mutations), ("crossover", cfg.crossovers)):
        made = 0
        for _ in range(50 * count):
            if made == count:
                break
            if kind == "mutation":
                child = mutant(space, rng.choice(parents), cfg, rng)
            else:
                child = space.repair(space.crossover(*rng.sample(parents, 2), rng), rng)
            if child not in seen:
                nxt.append(child)
                seen.add(child)
                made += 1
    return nxt


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (size, fitness) points: no other is smaller and fitter."""
    front, best = [], float("inf")
    for size, fit in sorted(points):
        if fit < best:
            front.append((size, fit))
            best = fit
    return front


def evolve(
    space: Space,
    evaluator: Evaluator,
    cfg: SearchConfig,
    rng: random.Random,
    pool: torch.Tensor | None = None,
    seeds: tuple = (),
) -> tuple[tuple, dict]:
    """Run the evolution; (best candidate, history for the report)."""
    pop, gamma = initial_population(space, cfg, rng, seeds)
    scores: dict = {}
    seen, history = set(pop), {"generations": [], "candidates": []}
    bar = tqdm(range(cfg.generations), desc="search", unit="gen", disable=not distributed.is_main())
    for gen in bar:
        if cfg.fresh_batches and pool is not None and gen:
            evaluator.reset(_windows(pool, cfg.fitness_samples, rng))
            scores = {}
        for cand in pop:
            if cand not in scores:
                scores[cand] = evaluator(cand)
                history["candidates"].append(
                    {
                        "generation": gen,
                        "fitness": scores[cand],
                        "params_removed": space.removed_params(cand),
                        "macs_removed": space.removed_macs(cand),
                    }
                )
        ranked = sorted(pop, key=scores.__getitem__)
        history["generations"].append(
            {
                "generation": gen,
                "best": scores[ranked[0]],
                "median": scores[ranked[len(ranked) // 2]],
            }
        )
        bar.set_postfix(best=f"{scores[ranked[0]]:.4g}")
        if gen + 1 < cfg.generations:
            pop = breed(space, ranked, cfg, rng, seen)
    history["inherit"] = gamma
    return ranked[0], history


def prune(model, tokens: torch.Tensor, cfg: SearchConfig, adapter=None) -> PruningPlan:
    """Search, then reform the winner in place (slice with slicing.apply_plan)."""
    adapter = adapter or get_adapter(model)
    rng = random.Random(cfg.seed)
    start = time.perf_counter()
    context = tokens.shape[1]
    stats, saliency_s = dense_pass(model, adapter, tokens, cfg.percdamp, context, **cfg.driver())
    space = Space(
        [s.space for s in stats], cfg.align or 0, cfg.budget, cfg.ratio, depth=cfg.search_depth
    )
    seeds = (
        (allocation_seed(space, model, adapter, stats, tokens, cfg),) if cfg.seed_allocation else ()
    )
    fit_tokens = _windows(tokens, cfg.fitness_samples, rng)
    home = next(model.parameters()).device
    evaluator = Evaluator(
        model,
        adapter,
        fit_tokens,
        cfg.fitness,
        cfg.device,
        cfg.batch_size,
        Compensator(adapter, stats, cfg.device, cfg.cache_mb) if cfg.compensate else None,
        cfg.cache_mb,
    )
    search_start = time.perf_counter()
    best, history = evolve(space, evaluator, cfg, rng, tokens, seeds)
    search_s = time.perf_counter() - search_start
    del evaluator
    model.to(home)
    plan = PruningPlan([g.plan() for g in best], method="search", target_ratio=cfg.ratio)
    reform_s = reform(
        model,
        adapter,
        tokens,
        plan,
        cfg.reformation,
        cfg.percdamp,
        cfg.admm_rho,
        cfg.admm_iters,
        **cfg.driver(),
    )
    plan.info = {
        "budget": cfg.budget,
        "fitness": cfg.fitness,
        "compensate": cfg.compensate,
        "reformation": cfg.reformation,
        "inherit": history.pop("inherit"),
        "search_seconds": search_s,
        "saliency_seconds": sum(saliency_s.values()),
        "reformation_seconds": sum(reform_s.values()),
        "total_seconds": time.perf_counter() - start,
        "candidates_evaluated": len(history["candidates"]),
        "candidates_per_second": len(history["candidates"]) / max(search_s, 1e-9),
        "params_removed": space.removed_params(best),
        "macs_removed": space.removed_macs(best),
        "pareto_params": pareto(
            [(1 - c["params_removed"], c["fitness"]) for c in history["candidates"]]
        ),
        "pareto_macs": pareto(
            [(1 - c["macs_removed"], c["fitness"]) for c in history["candidates"]]
        ),
        **history,
    }
    return plan
