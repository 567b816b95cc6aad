"""The search space of `search` (Shen et al., NeurIPS 2024), kept GQA-valid by construction.

A candidate is one `Gene` per decoder layer: the kept KV groups, the kept query heads (the
same number in every kept group), the kept FFN channels, and whether the whole layer is
dropped (`--search-depth`). Widths move in whole units only: a KV group, one query head per
group, or an FFN step (`--align` or 1/32 of the FFN). Channels inside a head are never
removed: that would break rotary pairs (the official code does it and rebuilds RoPE wrongly).

Saliency decides WHICH units a width keeps (`Space.top`): every unit has a score (sum of the
second-order saliency Phi_ij = W_ij^2 / [H^-1]_jj over the weights it owns, saliency.py), and
a width keeps the most salient units. The paper's mask mutation (Alg. 1) then redraws a
layer's kept set at random, keeping at least alpha of the old one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from ...plan import LayerPlan, Widths
from ..saliency import LayerSpace


@dataclass(frozen=True)
class Gene:
    kv: tuple[int, ...]  # kept KV groups
    heads: tuple[int, ...]  # kept query heads (sorted; equal count per kept group)
    channels: tuple[int, ...]  # kept FFN channels (sorted)
    dropped: bool = False  # the whole layer removed (depth search)

    def plan(self) -> LayerPlan:
        return LayerPlan(list(self.heads), list(self.kv), list(self.channels), self.dropped)

    def widths(self) -> Widths:
        return Widths(len(self.heads), len(self.kv), len(self.channels))


class Space:
    """Per-layer limits, costs and saliency, the budget, and the moves of the search."""

    def __init__(
        self,
        layers: list[LayerSpace],
        step: int,
        budget: str,
        ratio: float,
        tolerance: float = 0.005,
        depth: bool = False,
    ):
        self.layers, self.budget, self.ratio, self.depth = layers, budget, ratio, depth
        self.steps = [step if step else max(1, ls.dense.ffn // 32) for ls in layers]
        full = [self.full(i) for i in range(len(layers))]
        self.dense_params = sum(self.params(i, g) for i, g in enumerate(full))
        self.dense_macs = sum(self.macs(i, g) for i, g in enumerate(full))
        self.dense = self.dense_params if budget == "params" else self.dense_macs
        self.target = (1.0 - ratio) * self.dense  # what a candidate may keep
        self.tolerance = tolerance * self.dense

    # ---- sizes -------------------------------------------------------------------------
    def params(self, i: int, g: Gene) -> float:
        if g.dropped:
            return 0.0
        ls, c = self.layers[i], self.layers[i].costs
        return (
            ls.fixed
            + len(g.heads) * c["head"]
            + len(g.kv) * c["kv_head"]
            + len(g.channels) * c["channel"]
        )

    def macs(self, i: int, g: Gene) -> float:
        """MACs per token: the weights' (params less norms and o/down biases) + attention."""
        if g.dropped:
            return 0.0
        ls = self.layers[i]
        return self.params(i, g) - ls.fixed + len(g.heads) * ls.attn_macs

    def size(self, i: int, g: Gene) -> float:
        """The budget's quantity of layer i as g."""
        return self.params(i, g) if self.budget == "params" else self.macs(i, g)

    def total(self, cand) -> float:
        return sum(self.size(i, g) for i, g in enumerate(cand))

    def removed(self, cand) -> float:
        """Share of the dense budget quantity (params or MACs) this candidate removes."""
        return 1.0 - self.total(cand) / self.dense

    def removed_params(self, cand) -> float:
        return 1.0 - sum(self.params(i, g) for i, g in enumerate(cand)) / self.dense_params

    def removed_macs(self, cand) -> float:
        return 1.0 - sum(self.macs(i, g) for i, g in enumerate(cand)) / self.dense_macs

    def in_budget(self, cand) -> bool:
        return abs(self.total(cand) - self.target) <= self.tolerance

    # ---- genes from widths, by saliency ----------------------------------------------------
    def full(self, i: int) -> Gene:
        ls = self.layers[i]
        return Gene(
            tuple(range(ls.dense.kv_heads)),
            tuple(range(ls.dense.heads)),
            tuple(range(ls.dense.ffn)),
        )

    def top(self, i: int, n_kv: int, per_group: int, width: int, base: Gene | None = None) -> Gene:
        """Gene of these widths keeping the most salient units; with `base`, units of base are
        kept first (a width change moves the fewest units)."""
        ls = self.layers[i]
        prefer = (lambda kept, u: (u in kept,)) if base else (lambda kept, u: ())

        def best(pool, n, score, kept=()):
            kept = set(kept)
            return sorted(
                sorted(pool, key=lambda u: (*prefer(kept, u), score(u)), reverse=True)[:n]
            )

        group_score = [
            ls.kv_scores[g] + sum(ls.head_scores[g * ls.dense.rep : (g + 1) * ls.dense.rep])
            for g in range(ls.dense.kv_heads)
        ]
        kv = best(range(ls.dense.kv_heads), n_kv, group_score.__getitem__, base.kv if base else ())
        heads = []
        for g in kv:
            heads += best(
                range(g * ls.dense.rep, (g + 1) * ls.dense.rep),
                per_group,
                ls.head_scores.__getitem__,
                base.heads if base else (),
            )
        channels = best(
            range(ls.dense.ffn), width, ls.channel_scores.__getitem__, base.channels if base else ()
        )
        return Gene(tuple(kv), tuple(sorted(heads)), tuple(channels))

    def resize(self, i: int, g: Gene, d_kv: int = 0, d_per: int = 0, d_ffn: int = 0) -> Gene | None:
        """g with widths moved by whole units (None when out of range)."""
        if g.dropped:
            return None
        ls = self.layers[i]
        w = g.widths()
        n_kv, per, width = w.kv_heads + d_kv, w.rep + d_per, w.ffn + d_ffn * self.steps[i]
        width = min(width, ls.dense.ffn) if d_ffn > 0 else width
        if not (
            1 <= n_kv <= ls.dense.kv_heads
            and 1 <= per <= ls.dense.rep
            and 1 <= width <= ls.dense.ffn
        ):
            return None
        return self.top(i, n_kv, per, width, base=g)

    def uniform(self, keep: float) -> tuple[Gene, ...]:
        """Every layer keeps the share `keep` of its units (the inheriting ratio gamma)."""
        genes = []
        for i, ls in enumerate(self.layers):
            per = max(1, round(keep * ls.dense.rep)) if ls.dense.rep > 1 else 1
            n_kv = (
                ls.dense.kv_heads if ls.dense.rep > 1 else max(1, round(keep * ls.dense.kv_heads))
            )
            genes.append(self.top(i, n_kv, per, max(1, round(keep * ls.dense.ffn))))
        return tuple(genes)

    # ---- the search's moves -----------------------------------------------------------
    def mutate(
        self,
        cand,
        rng: random.Random,
        p_width: float,
        p_mask: float,
        alpha: float = 0.8,
        p_depth: float = 0.0,
    ) -> tuple[Gene, ...]:
        out = list(cand)
        for i, g in enumerate(out):
            alive = sum(not x.dropped for x in out)
            if self.depth and rng.random() < p_depth and (g.dropped or alive > 1):
                g = replace(g, dropped=True) if not g.dropped else self.full(i)
            if g.dropped:
                out[i] = g
                continue
            if rng.random() < p_width:
                dim = rng.choice(("kv", "per", "ffn", "ffn"))
                delta = rng.choice((-1, 1)) * (rng.randint(1, 3) if dim == "ffn" else 1)
                g = self.resize(i, g, **{f"d_{dim}": delta}) or g
            if rng.random() < p_mask:
                g = self.redraw(i, g, rng, alpha)
            out[i] = g
        return tuple(out)

    def redraw(self, i: int, g: Gene, rng: random.Random, alpha: float) -> Gene:
        """Alg. 1 (mask mutation): a random kept set of the same size that overlaps the old
        one in at least ceil(alpha * size) units, for the channels and for the heads inside
        every kept group (drawn directly instead of by rejection)."""
        ls = self.layers[i]

        def draw(old, pool):
            old, pool = list(old), list(pool)
            stay = rng.sample(old, math.ceil(alpha * len(old)))
            rest = [u for u in pool if u not in stay]
            return tuple(sorted(stay + rng.sample(rest, len(old) - len(stay))))

        heads = []
        for grp in g.kv:
            mine = [h for h in g.heads if h // ls.dense.rep == grp]
            heads += draw(mine, range(grp * ls.dense.rep, (grp + 1) * ls.dense.rep))
        return Gene(g.kv, tuple(sorted(heads)), draw(g.channels, range(ls.dense.ffn)), g.dropped)

    def crossover(self, a, b, rng: random.Random) -> tuple[Gene, ...]:
        """Layer-wise uniform crossover: each layer's gene from one parent."""
        return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

    def repair(self, cand, rng: random.Random, frozen=frozenset()) -> tuple[Gene, ...]:
        """Move FFN width between layers until the candidate is within the budget's tolerance
        (every candidate is valid and in budget: nothing is rejected and redrawn). Random
        layers other than the `frozen` ones (those the mutation just changed) lose or gain
        up to one FFN step of their least / most salient channels, never more than the gap;
        head widths move only where no FFN width is left. Layers after the first frozen one
        go first: the layers before it stay as the parent had them, so the child shares that
        prefix with its parent and fitness reuses its hidden states (fitness.py)."""
        out = list(cand)
        first = min(frozen, default=0)
        for _ in range(100 * len(out) * max(ls.dense.ffn for ls in self.layers)):
            gap = self.total(out) - self.target
            if abs(gap) <= self.tolerance:
                return tuple(out)
            sign = -1 if gap > 0 else 1
            late = [i for i in range(first, len(out)) if i not in frozen]
            early = [i for i in range(first) if i not in frozen]
            rng.shuffle(late)
            rng.shuffle(early)
            for i in late + sorted(frozen) + early:
                g = self._move_toward(i, out[i], sign, abs(gap))
                if g is not None:
                    out[i] = g
                    break
            else:
                raise ValueError(
                    f"no candidate of this space meets the budget "
                    f"(ratio {self.ratio}); lower --ratio"
                )
        raise RuntimeError("repair did not converge")

    def _move_toward(self, i: int, g: Gene, sign: int, gap: float) -> Gene | None:
        """One FFN step (at most the channels `gap` needs), else one head move; growing
        restores a dropped layer at its smallest width."""
        if g.dropped:
            return (
                self.top(i, 1, 1, min(self.steps[i], self.layers[i].dense.ffn))
                if sign > 0
                else None
            )
        ls = self.layers[i]
        n_kv, per, width = len(g.kv), g.widths().rep, len(g.channels)
        per_channel = self.size(i, replace(g, channels=g.channels + (0,))) - self.size(i, g)
        need = max(1, math.ceil((gap - self.tolerance / 2) / max(per_channel, 1e-9)))
        new = width + sign * min(self.steps[i], need)
        if 1 <= new <= ls.dense.ffn and new != width:
            return self.top(i, n_kv, per, new, base=g)
        return self.resize(i, g, d_per=sign) or self.resize(i, g, d_kv=sign)
