"""Fitness of search candidates without materialising them.

A candidate runs on the DENSE weights: every layer through slimops.virtual (slice_gemm with
the candidate's index lists), from the hidden states of the longest prefix of layers it
shares with a candidate already evaluated (LRU cache, bounded in bytes). Fitness is the
perplexity of the calibration tokens held in for fitness, or the KL divergence from the dense
model's cached next-token distributions (encoders: 1 - cosine to the dense sentence
embeddings, mean-pooled as sentence-transformers).

With `compensate`, o_proj's and down_proj's kept columns are first refit by least squares on
the dense-input Hessians of the saliency pass (the reformation the winner gets, done inside
the search: W_K' = W H[:, K] H[K, K]^-1), cached per layer gene, so fitness ranks candidates
by roughly what they will score after reformation instead of by their raw masks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ... import distributed
from ...sequential import LayerWork, PhaseTimer, capture_inputs
from ...slicing import head_rows
from ...virtual import virtual_layer
from ..obs_solver import refit


class ByteLRU(OrderedDict):
    """An LRU dict bounded by the bytes of its values: `put` evicts the least recently used
    entries (the new one too, if it alone is over the limit) and returns the value."""

    def __init__(self, limit_mb: float, nbytes: Callable[[object], int]):
        super().__init__()
        self.limit, self.nbytes, self.bytes = limit_mb * 2**20, nbytes, 0

    def get(self, key, default=None):
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def put(self, key, value):
        self[key] = value
        self.bytes += self.nbytes(value)
        while self.bytes > self.limit and self:
            self.bytes -= self.nbytes(self.popitem(last=False)[1])
        return value


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Compensator:
    """Refit o_proj / down_proj kept columns of a layer gene, cached per gene in an LRU
    bounded in bytes (a refit is two dense weight matrices: on a 7B model ~0.2 GB, and a
    search meets thousands of genes)."""

    def __init__(self, adapter, stats, device, cache_mb: float = 1024):
        self.adapter, self.stats, self.device = adapter, stats, device
        self.cache = ByteLRU(cache_mb, lambda refits: sum(map(_tensor_bytes, refits.values())))

    def __call__(self, i: int, gene) -> dict:
        key = (i, gene.heads, gene.channels)
        cached = self.cache.get(key)
        return cached if cached is not None else self.cache.put(key, self._refit(i, gene))

    def _refit(self, i: int, gene) -> dict:
        layer, st = self.adapter.layers()[i], self.stats[i]
        o, down = self.adapter.o_proj(layer), self.adapter.down_proj(layer)
        cols = head_rows(list(gene.heads), self.adapter.head_dim).to(self.device)
        ch = torch.as_tensor(gene.channels, dtype=torch.long, device=self.device)
        return {
            "o": refit(o.weight.float(), st.H_o.to(self.device), cols).to(o.weight.dtype),
            "down": refit(down.weight.float(), st.H_down.to(self.device), ch).to(down.weight.dtype),
        }


class Evaluator:
    """fitness(candidate) -> float (lower is better), with prefix reuse."""

    def __init__(
        self,
        model,
        adapter,
        tokens: torch.Tensor,
        fitness: str,
        device,
        batch_size: int = 8,
        compensator: Compensator | None = None,
        cache_mb: float = 1024,
    ):
        self.model, self.adapter, self.fitness = model, adapter, fitness
        self.device, self.compensator = torch.device(device), compensator
        self.causal = adapter.causal_lm
        if fitness == "ppl" and not self.causal:
            raise ValueError(
                "--fitness ppl needs a causal LM; encoders use --fitness kl "
                "(distance to the dense embeddings)"
            )
        model.to(self.device)
        self.batch_size, self.cache_mb = batch_size, cache_mb
        self.gene_ids: dict = {}
        self.evaluated = self.layers_run = 0
        self.reset(tokens)

    def reset(self, tokens: torch.Tensor) -> None:
        """Evaluate on these calibration windows from now on (fresh batches)."""
        self.inputs, self.kwargs = capture_inputs(
            self.adapter, tokens, self.batch_size, self.device
        )
        self.tokens = [
            tokens[i : i + self.batch_size].to(self.device)
            for i in range(0, tokens.shape[0], self.batch_size)
        ]
        self.cache = ByteLRU(self.cache_mb, _tensor_bytes)
        needs_reference = self.fitness == "kl" or not self.causal  # ppl needs the tokens only
        self.reference = (
            [self._reference(h) for h in self._dense_outputs()] if needs_reference else None
        )

    # ---- forward ---------------------------------------------------------------------------
    @torch.no_grad()
    def _dense_outputs(self) -> list[torch.Tensor]:
        outs = []
        for hidden in self.inputs:
            for layer in self.adapter.layers():
                hidden = self._layer_forward(layer, hidden)
            outs.append(hidden)
        return outs

    def _layer_forward(self, layer, hidden):
        work = LayerWork(0, layer, self.adapter, [], self.kwargs, self.device, PhaseTimer())
        return work.forward(hidden)

    @torch.no_grad()
    def _final(self, i: int, cand) -> torch.Tensor:
        """Hidden states after the last layer, from the longest cached prefix."""
        key = [self.gene_ids.setdefault(g, len(self.gene_ids)) for g in cand]
        start = next((k for k in range(len(cand), 0, -1) if (i, *key[:k]) in self.cache), 0)
        hidden = self.cache.get((i, *key[:start])) if start else self.inputs[i]
        layers = self.adapter.layers()
        for k in range(start, len(cand)):
            gene = cand[k]
            if not gene.dropped:
                replace = self.compensator(k, gene) if self.compensator else None
                with virtual_layer(self.adapter, layers[k], gene.plan(), replace):
                    hidden = self._layer_forward(layers[k], hidden)
                self.layers_run += 1
            self.cache.put((i, *key[: k + 1]), hidden)
        return hidden

    # ---- fitness ---------------------------------------------------------------------------
    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (causal LM) or L2-normalised mean-pooled embeddings (encoder)."""
        if not self.causal:
            return F.normalize(hidden.float().mean(1), dim=-1)
        norm = self.adapter.final_norm()
        return self.model.get_output_embeddings()(norm(hidden) if norm is not None else hidden)

    def _reference(self, hidden):
        out = self._head(hidden)
        return out if not self.causal else F.log_softmax(out.float(), -1)

    @torch.no_grad()
    def __call__(self, cand) -> float:
        self.evaluated += 1
        total, count = 0.0, 0
        for i in range(len(self.inputs)):
            out = self._head(self._final(i, cand))
            if not self.causal:
                total += float((1 - (out * self.reference[i]).sum(-1)).sum())
                count += out.shape[0]
            elif self.fitness == "ppl":
                ids = self.tokens[i]
                total += float(
                    F.cross_entropy(
                        out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
                    )
                )
                count += ids[:, 1:].numel()
            else:
                logp = F.log_softmax(out.float(), -1)
                ref = self.reference[i]
                total += float((ref.exp() * (ref - logp)).sum())
                count += ref.shape[0] * ref.shape[1]
        mean = distributed.all_sum_float(total) / distributed.all_sum_float(count)
        return float(torch.tensor(mean).exp()) if self.fitness == "ppl" else mean
