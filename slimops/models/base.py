"""DecoderAdapter: where a LLaMA-like decoder keeps its projections, norms and head geometry.

A family that differs only in module names or biases subclasses this and overrides the
names; the rest of slimops talks to models only through an adapter.
"""
from __future__ import annotations

import torch
from torch import nn


class DecoderAdapter:
    model_types: tuple[str, ...] = ()
    # Where each projection lives, as a dotted path inside one layer. gate is None for a
    # plain (non-gated) FFN such as BERT's.
    paths = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
             "down": "mlp.down_proj"}
    attention_path = "self_attn"        # the module whose head-count attributes HF reads
    layers_path = "model.layers"
    backbone_path = "model"
    auto_model_class = "AutoModelForCausalLM"
    causal_lm = True

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.config
        self.config = cfg
        self.hidden_size = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.intermediate_size = cfg.intermediate_size

    # ---- where things are -------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.config.model_type

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    def backbone(self) -> nn.Module:
        """The module whose forward runs embeddings, rotary, masks and then the layers."""
        return self.model.get_submodule(self.backbone_path)

    def linear(self, layer, role: str) -> nn.Linear | None:
        """The projection `role` (q, k, v, o, gate, up, down) of `layer`; None if absent."""
        path = self.paths[role]
        return None if path is None else layer.get_submodule(path)

    def set_linear(self, layer, role: str, module: nn.Linear) -> None:
        parent, _, name = self.paths[role].rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, name, module)

    def attention(self, layer) -> nn.Module:
        return layer.get_submodule(self.attention_path)

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
    def layer_shape(self, layer) -> tuple[int, int, int]:
        """(query heads, KV heads, FFN width) read from the layer's current modules."""
        q, k, _ = self.qkv(layer)
        return (q.out_features // self.head_dim, k.out_features // self.head_dim,
                self.down_proj(layer).in_features)

    def set_layer_geometry(self, layer, num_heads: int, num_kv_heads: int) -> None:
        """Tell the attention module its new head counts (HF reads num_key_value_groups)."""
        a = self.attention(layer)
        a.num_key_value_groups = num_heads // num_kv_heads
        for attr, val in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if hasattr(a, attr):
                setattr(a, attr, val)

    @staticmethod
    def _numel(linear: nn.Linear) -> int:
        return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)

    def unit_costs(self, layer) -> dict[str, int]:
        """Parameters removed by one query head, one KV head (k+v only), one FFN channel."""
        nh, nkv, ffn = self.layer_shape(layer)
        q, k, v = self.qkv(layer)
        o = self.o_proj(layer)
        down = self.down_proj(layer)
        return {"head": self._numel(q) // nh + o.weight.shape[0] * self.head_dim,
                "kv_head": (self._numel(k) + self._numel(v)) // nkv,
                "channel": sum(self._numel(m) for m in self.ffn_inputs(layer)) // ffn
                + down.weight.shape[0]}

    def layer_params(self, layer) -> int:
        return sum(p.numel() for p in layer.parameters())

    def decoder_params(self) -> int:
        return sum(self.layer_params(layer) for layer in self.layers())

    def total_params(self) -> int:
        seen, n = set(), 0
        for p in self.model.parameters():      # tied embeddings counted once
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                n += p.numel()
        return n

    def check_geometry(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}: GQA cannot be honoured")

    @torch.no_grad()
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
