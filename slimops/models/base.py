"""DecoderAdapter: where a model keeps its projections, norms and head geometry.

Everything comes from the family's row in remote_modeling.FAMILY_SPECS (the table the
checkpoint's standalone modeling file uses too), so the paths exist once. The rest of
slimops talks to models only through an adapter.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from . import remote_modeling as remote


class Widths(NamedTuple):
    """One decoder layer's widths: query heads, KV heads (groups), FFN channels. The one
    type for a layer's shape: adapters read it from the modules (`layer_shape`), plans and
    search genes report it, sheared's target Shape holds one."""

    heads: int
    kv_heads: int
    ffn: int

    @property
    def rep(self) -> int:
        """Query heads per KV group."""
        return self.heads // self.kv_heads

    def config(self) -> dict:
        """The per-layer config keys of a checkpoint (num_attention_heads, ...)."""
        return dict(zip(remote.SHAPE_KEYS, self))

    def check_within(self, dense: Widths, what: str = "target") -> None:
        """ValueError unless these widths are a valid GQA sub-shape of `dense`."""
        for name, want, have in zip(self._fields, self, dense):
            if not 1 <= want <= have:
                raise ValueError(f"{what} {name}={want} must be in [1, {have}] (the source's)")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"{what} heads={self.heads} is not a multiple of kv_heads={self.kv_heads}"
            )
        if self.rep > dense.rep:
            raise ValueError(
                f"{what} keeps {self.rep} query heads per KV group; the source has only {dense.rep}"
            )


class DecoderAdapter:
    """Adapter for the LLaMA-like families (q/k/v/o + gate/up/down; Mistral, Qwen2/3)."""

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = self.config = model.config
        self.spec = remote.family_spec(cfg.model_type)
        self.paths = {role: path for role, (path, _, _) in self.spec["projections"].items()}
        self.hidden_size = cfg.hidden_size
        self.head_dim = remote.head_dim_of(cfg)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.intermediate_size = cfg.intermediate_size

    # ---- where things are -------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.config.model_type

    @property
    def auto_model_class(self) -> str:
        return self.spec["auto_class"]

    @property
    def causal_lm(self) -> bool:
        return self.auto_model_class == "AutoModelForCausalLM"

    def backbone(self) -> nn.Module:
        """The module whose forward runs embeddings, rotary, masks and then the layers: the
        base model (LlamaForCausalLM.model; a bare BertModel is its own base model)."""
        return self.model.base_model

    def layers(self) -> nn.ModuleList:
        return self.backbone().get_submodule(self.spec["layers"])

    def final_norm(self) -> nn.Module | None:
        """The norm between the last layer and the LM head (None: the layers end normed)."""
        path = self.spec["final_norm"]
        return None if path is None else self.backbone().get_submodule(path)

    def linear(self, layer, role: str) -> nn.Linear | None:
        """The projection `role` (q, k, v, o, gate, up, down) of `layer`; None if absent."""
        path = self.paths.get(role)
        return None if path is None else layer.get_submodule(path)

    def set_linear(self, layer, role: str, module: nn.Linear) -> None:
        parent, _, name = self.paths[role].rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, name, module)

    def hidden_norms(self, layer) -> list[nn.Module]:
        """The layer's own norms over the hidden dimension (input and post-attention
        RMSNorms; Qwen3's per-head q/k norms sit inside the attention and are not these)."""
        return [
            m
            for m in layer.children()
            if getattr(m, "weight", None) is not None
            and m.weight.dim() == 1
            and m.weight.numel() == self.hidden_size
        ]

    def attention(self, layer) -> nn.Module:
        return layer.get_submodule(self.spec["attention"])

    def qkv(self, layer) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return tuple(self.linear(layer, r) for r in ("q", "k", "v"))

    def o_proj(self, layer) -> nn.Linear:
        return self.linear(layer, "o")

    def ffn_inputs(self, layer) -> list[nn.Linear]:
        """The FFN projections whose output rows are the channels: [gate, up] or [up]."""
        return [m for m in (self.linear(layer, "gate"), self.linear(layer, "up")) if m is not None]

    def down_proj(self, layer) -> nn.Linear:
        return self.linear(layer, "down")

    # ---- geometry ---------------------------------------------------------------------
    def layer_shape(self, layer) -> Widths:
        """(query heads, KV heads, FFN width) read from the layer's current modules."""
        q, k, _ = self.qkv(layer)
        return Widths(
            q.out_features // self.head_dim,
            k.out_features // self.head_dim,
            self.down_proj(layer).in_features,
        )

    def set_layer_geometry(self, layer, num_heads: int, num_kv_heads: int) -> None:
        """Tell the attention module its new head counts (the same code the checkpoint's
        standalone modeling file runs on load)."""
        remote.set_attention_geometry(self.attention(layer), num_heads, num_kv_heads, self.head_dim)

    @staticmethod
    def _numel(linear: nn.Linear) -> int:
        return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)

    def unit_costs(self, layer) -> dict[str, int]:
        """Parameters removed by one query head, one KV head (k+v only), one FFN channel."""
        nh, nkv, ffn = self.layer_shape(layer)
        q, k, v = self.qkv(layer)
        o = self.o_proj(layer)
        down = self.down_proj(layer)
        return {
            "head": self._numel(q) // nh + o.weight.shape[0] * self.head_dim,
            "kv_head": (self._numel(k) + self._numel(v)) // nkv,
            "channel": sum(self._numel(m) for m in self.ffn_inputs(layer)) // ffn
            + down.weight.shape[0],
        }

    def layer_params(self, layer) -> int:
        return sum(p.numel() for p in layer.parameters())

    def decoder_params(self) -> int:
        return sum(self.layer_params(layer) for layer in self.layers())

    def total_params(self) -> int:
        """Every parameter once (tied embeddings count once)."""
        return self.model.num_parameters()

    def check_geometry(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}: GQA cannot be honoured"
            )
