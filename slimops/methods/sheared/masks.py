"""Sheared-LLaMA's masks on a LLaMA-like model: where each gate multiplies, the expected size
they imply (GQA counted), the Lagrangian that pulls it to the target shape, and the final
deterministic masks folded into the weights.

Gate families and where they multiply (one forward hook each; the model code is untouched):

| family | shape | multiplies |
|---|---|---|
| hidden | [D] | embedding output, every RMSNorm output, every attention and MLP output |
| layer | [L] | the layer's attention and MLP outputs (0: the layer is skipped) |
| attn, mlp | [L] | the attention / MLP output (learned block gates, no size target) |
| head | [L, H] | each query head's attention context, before o_proj |
| kv | [L, KV] | the contexts of all query heads of its group (= scaling its v head) |
| ffn | [L, M] | each FFN channel, before down_proj |

RMSNorm under a hidden mask takes its mean over the kept dimensions only (the residual is
exactly zero on the others), which is what the sliced model computes. The official code has
no GQA (their issues #62, #75); here a KV group's gate multiplies all its query heads, and
the final masks keep the same number of query heads in every kept group.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ...plan import LayerPlan, PruningPlan, Widths
from .hard_concrete import HardConcrete

FAMILIES = ("hidden", "layer", "attn", "mlp", "head", "kv", "ffn")
TARGETED = ("hidden", "layer", "head", "kv", "ffn")  # families with a size target (Lagrangian)


@dataclass(frozen=True)
class Shape:
    """A uniform architecture: the target of shearing, `layers` layers of these widths on a
    `hidden`-wide residual stream (flat fields: they are the --target keys)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int

    @property
    def widths(self) -> Widths:
        """Every kept layer's widths."""
        return Widths(self.heads, self.kv_heads, self.ffn)

    def check_within(self, source: Shape) -> None:
        for name in ("hidden", "layers"):
            want, have = getattr(self, name), getattr(source, name)
            if not 1 <= want <= have:
                raise ValueError(f"target {name}={want} must be in [1, {have}] (the source's)")
        self.widths.check_within(source.widths)


@dataclass(frozen=True)
class Geometry:
    """What the size formula needs of one (dense) layer: widths and which biases exist."""

    shape: Shape
    head_dim: int
    norms: int  # hidden-wide norm weights per layer
    q_bias: int
    kv_bias: int  # 0, 1 or 2 (k and v)
    o_bias: int
    ffn_in: int  # FFN projections hidden -> channels (2: gate and up)
    ffn_in_bias: int
    down_bias: int
    extra: int  # per-layer parameters no mask changes (Qwen3's q/k norms)

    @classmethod
    def of(cls, adapter) -> Geometry:
        layer = adapter.layers()[0]
        q, k, v = adapter.qkv(layer)
        nh, nkv, ffn = adapter.layer_shape(layer)
        shape = Shape(adapter.hidden_size, len(adapter.layers()), nh, nkv, ffn)

        def has_bias(*mods):
            return sum(m.bias is not None for m in mods)

        ffn_in = adapter.ffn_inputs(layer)
        geo = cls(
            shape,
            adapter.head_dim,
            len(adapter.hidden_norms(layer)),
            has_bias(q),
            has_bias(k, v),
            has_bias(adapter.o_proj(layer)),
            len(ffn_in),
            has_bias(*ffn_in),
            has_bias(adapter.down_proj(layer)),
            0,
        )
        extra = adapter.layer_params(layer) - int(geo.layer_size(*_dense_widths(shape)))
        return cls(**{**geo.__dict__, "extra": extra})

    def layer_size(self, D, Q, K, M):
        """Parameters of one layer with D hidden dims, Q query heads, K KV heads, M
        channels (numbers or tensors: the expected size feeds it expectations)."""
        hd = self.head_dim
        attn = (2 * D + self.q_bias) * hd * Q + (2 * D + self.kv_bias) * hd * K + self.o_bias * D
        mlp = (self.ffn_in * D + self.ffn_in_bias) * M + D * M + self.down_bias * D
        return self.norms * D + self.extra + attn + mlp

    def size(self, shape: Shape) -> int:
        """Decoder-layer parameters of a uniform model of `shape`."""
        return shape.layers * int(
            self.layer_size(shape.hidden, shape.heads, shape.kv_heads, shape.ffn)
        )


def _dense_widths(shape: Shape):
    return shape.hidden, shape.heads, shape.kv_heads, shape.ffn


class ShearedMasks(nn.Module):
    """Every gate of one model plus the Lagrange multipliers (lambda_1, lambda_2) per
    targeted family."""

    def __init__(self, geometry: Geometry, droprate_init: float = 0.01, seed: int = 0):
        super().__init__()
        self.geometry = geometry
        s = geometry.shape
        shapes = {
            "hidden": (s.hidden,),
            "layer": (s.layers,),
            "attn": (s.layers,),
            "mlp": (s.layers,),
            "head": (s.layers, s.heads),
            "kv": (s.layers, s.kv_heads),
            "ffn": (s.layers, s.ffn),
        }
        g = torch.Generator().manual_seed(seed)
        self.gates = nn.ModuleDict(
            {name: HardConcrete(shapes[name], droprate_init, g) for name in FAMILIES}
        )
        self.lambdas = nn.ParameterDict({name: nn.Parameter(torch.zeros(2)) for name in TARGETED})

    def mask_parameters(self) -> list[nn.Parameter]:
        return [gate.log_alpha for gate in self.gates.values()]

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {name: self.gates[name].sample(generator) for name in FAMILIES}

    def keep_probs(self) -> dict[str, torch.Tensor]:
        return {name: self.gates[name].keep_prob() for name in FAMILIES}

    def clamp_(self) -> None:
        for gate in self.gates.values():
            gate.clamp_()

    # ---- size and the Lagrangian --------------------------------------------------------
    def expected_size(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """E[decoder-layer parameters] for keep probabilities p (gates independent, so the
        expectation of each product is the product of expectations). For 0/1 masks this is
        the exact parameter count of the sliced model. A query head counts only with its
        KV group (p_head * p_kv); the block gates are gates, not structure."""
        rep = self.geometry.shape.heads // self.geometry.shape.kv_heads
        D = p["hidden"].sum()
        Q = (p["head"] * p["kv"].repeat_interleave(rep, dim=1)).sum(1)
        K, M = p["kv"].sum(1), p["ffn"].sum(1)
        return (p["layer"] * self.geometry.layer_size(D, Q, K, M)).sum()

    def kept_fractions(self, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Expected kept share of each targeted family (query heads counted with their group)."""
        rep = self.geometry.shape.heads // self.geometry.shape.kv_heads
        heads = p["head"] * p["kv"].repeat_interleave(rep, dim=1)
        return {
            "hidden": p["hidden"].mean(),
            "layer": p["layer"].mean(),
            "head": heads.mean(),
            "kv": p["kv"].mean(),
            "ffn": p["ffn"].mean(),
        }

    def lagrangian(
        self, fractions: dict[str, torch.Tensor], target: Shape, ramp: float
    ) -> torch.Tensor:
        """sum_f lambda_1 (s_f - t_f) + lambda_2 (s_f - t_f)^2 with the target ramped from the
        source shape (ramp 0) to `target` (ramp 1). The caller maximises it in the lambdas."""
        total = 0.0
        for name, want in target_fractions(self.geometry.shape, target).items():
            t = 1.0 - (1.0 - want) * ramp
            gap = fractions[name] - t
            lam = self.lambdas[name]
            total = total + lam[0] * gap + lam[1] * gap * gap
        return total

    # ---- the final masks ----------------------------------------------------------------
    @torch.no_grad()
    def final_gates(self, target: Shape) -> dict[str, torch.Tensor]:
        """Deterministic gates of exactly the target shape: each family's top-scoring units
        keep their score (folded into the weights later), the rest are 0. Within each
        layer the top `kv_heads` groups are kept, then the top heads/kv_heads query heads
        of each kept group, so the result is a valid GQA shape."""
        s = {name: self.gates[name].score().float().cpu() for name in FAMILIES}
        z = {name: torch.zeros_like(v) for name, v in s.items()}
        _keep_top(z["hidden"], s["hidden"], target.hidden)
        _keep_top(z["layer"], s["layer"], target.layers)
        z["attn"], z["mlp"] = s["attn"], s["mlp"]
        rep = self.geometry.shape.heads // self.geometry.shape.kv_heads
        per_group = target.heads // target.kv_heads
        for i in range(self.geometry.shape.layers):
            _keep_top(z["kv"][i], s["kv"][i], target.kv_heads)
            for g in z["kv"][i].nonzero().flatten().tolist():
                _keep_top(
                    z["head"][i, g * rep : (g + 1) * rep],
                    s["head"][i, g * rep : (g + 1) * rep],
                    per_group,
                )
            _keep_top(z["ffn"][i], s["ffn"][i], target.ffn)
        return z


def _keep_top(out: torch.Tensor, scores: torch.Tensor, k: int) -> None:
    """out[top-k of scores] = their scores (ties to the lower index), in place."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    out[order] = scores[order]


def target_fractions(source: Shape, target: Shape) -> dict[str, float]:
    return {
        "hidden": target.hidden / source.hidden,
        "layer": target.layers / source.layers,
        "head": target.heads / source.heads,
        "kv": target.kv_heads / source.kv_heads,
        "ffn": target.ffn / source.ffn,
    }


def plan_from_gates(z: dict[str, torch.Tensor]) -> PruningPlan:
    """The PruningPlan (kept indices, dropped layers, kept hidden dims) of final gates."""

    def kept(t):
        return t.nonzero().flatten().tolist()

    layers = [
        LayerPlan(kept(z["head"][i]), kept(z["kv"][i]), kept(z["ffn"][i]), not bool(z["layer"][i]))
        for i in range(z["layer"].numel())
    ]
    return PruningPlan(layers, method="sheared", kept_hidden=kept(z["hidden"]))


# ---- applying gates: hooks while training, folding at the end -----------------------------
def _scale_heads(scale, head_dim, module, args):
    x = args[0]
    per_col = scale.repeat_interleave(head_dim).to(x.dtype)
    return (x * per_col,) + tuple(args[1:])


def _scale_input(scale, module, args):
    return (args[0] * scale.to(args[0].dtype),) + tuple(args[1:])


def _scale_output(scale, module, args, out):
    return out * scale.to(out.dtype)


def _masked_norm(hidden, kept, module, args, out):
    """RMSNorm with the mean over the kept dimensions only, times the hidden gate."""
    x = args[0]
    x32 = x.float()
    var = x32.pow(2).sum(-1, keepdim=True) / kept
    y = (x32 * torch.rsqrt(var + module.variance_epsilon)).to(x.dtype)
    return module.weight * y * hidden.to(x.dtype)


@contextmanager
def gated(adapter, z: dict[str, torch.Tensor]):
    """Run the model with gates z (training samples or final gates) in place."""
    model, geo_rep = adapter.model, adapter.num_heads // adapter.num_kv_heads
    hidden = z["hidden"]
    kept = (hidden != 0).sum().clamp(min=1).to(hidden.dtype)
    norm_hook = partial(_masked_norm, hidden, kept)
    hooks = [model.get_input_embeddings().register_forward_hook(partial(_scale_output, hidden))]
    hooks.append(adapter.final_norm().register_forward_hook(norm_hook))
    for i, layer in enumerate(adapter.layers()):
        hooks += [norm.register_forward_hook(norm_hook) for norm in adapter.hidden_norms(layer)]
        heads = z["head"][i] * z["kv"][i].repeat_interleave(geo_rep)
        o, down = adapter.o_proj(layer), adapter.down_proj(layer)
        hooks += [
            o.register_forward_pre_hook(partial(_scale_heads, heads, adapter.head_dim)),
            o.register_forward_hook(partial(_scale_output, z["layer"][i] * z["attn"][i] * hidden)),
            down.register_forward_pre_hook(partial(_scale_input, z["ffn"][i])),
            down.register_forward_hook(
                partial(_scale_output, z["layer"][i] * z["mlp"][i] * hidden)
            ),
        ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def fold_gates(adapter, z: dict[str, torch.Tensor]) -> None:
    """Multiply final gates into the weights, so the unhooked model computes what `gated`
    computes (units with gate 0 become exact zeros, sliced away later). With tied
    embeddings the hidden gate reaches the LM head through the embedding: it is not also
    folded into the final norm (the official code folds it twice, a known bug)."""
    model = adapter.model
    rep = adapter.num_heads // adapter.num_kv_heads
    emb = model.get_input_embeddings()
    hidden = z["hidden"].to(emb.weight)
    emb.weight.mul_(hidden)
    head = model.get_output_embeddings()
    if head is None or head.weight is not emb.weight:
        adapter.final_norm().weight.mul_(hidden)
    for i, layer in enumerate(adapter.layers()):
        for norm in adapter.hidden_norms(layer):
            norm.weight.mul_(hidden)
        heads = (z["head"][i] * z["kv"][i].repeat_interleave(rep)).to(hidden)
        _fold_linear(
            adapter.o_proj(layer),
            heads.repeat_interleave(adapter.head_dim),
            z["layer"][i] * z["attn"][i] * hidden,
        )
        _fold_linear(
            adapter.down_proj(layer), z["ffn"][i].to(hidden), z["layer"][i] * z["mlp"][i] * hidden
        )


def _fold_linear(linear: nn.Linear, in_scale: torch.Tensor, out_scale: torch.Tensor) -> None:
    out_scale = out_scale.to(linear.weight)
    linear.weight.mul_(in_scale.to(linear.weight)[None, :]).mul_(out_scale[:, None])
    if linear.bias is not None:
        linear.bias.mul_(out_scale)
