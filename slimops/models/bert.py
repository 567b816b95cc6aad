"""BERT-style encoders (BertModel, and task-head models such as BertForMaskedLM).

Post-LayerNorm multi-head attention (every head is its own "KV group": k and v have one
head per query head), biases on every projection and a plain GELU FFN:

    attention.self.{query,key,value} -> attention.output.dense -> + residual, LayerNorm
    intermediate.dense -> GELU -> output.dense -> + residual, LayerNorm

Head pruning removes rows of query/key/value (and their biases) and columns of
attention.output.dense; HF's BertSelfAttention reshapes with -1 heads, so only its
`num_attention_heads` / `all_head_size` attributes need updating.
"""
from torch import nn

from . import register
from .base import DecoderAdapter


@register
class BertAdapter(DecoderAdapter):
    model_types = ("bert",)
    paths = {"q": "attention.self.query", "k": "attention.self.key",
             "v": "attention.self.value", "o": "attention.output.dense", "gate": None,
             "up": "intermediate.dense", "down": "output.dense"}
    attention_path = "attention.self"
    auto_model_class = "AutoModel"
    causal_lm = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        # A bare BertModel is its own base model; task-head models keep it under
        # base_model_prefix ("bert"), so the layer paths gain that prefix.
        base = getattr(model, "base_model", model)
        prefix = "" if base is model else f"{model.base_model_prefix}."
        self.backbone_path = prefix.rstrip(".")        # "" is the model itself
        self.layers_path = f"{prefix}encoder.layer"
        # BertConfig has no num_key_value_heads: plain MHA.
        self.num_kv_heads = self.num_heads

    def set_layer_geometry(self, layer, num_heads: int, num_kv_heads: int) -> None:
        """BertSelfAttention keeps its head count and the q/k/v width as attributes."""
        if num_heads != num_kv_heads:
            raise ValueError(f"BERT attention is multi-head: {num_heads} query heads need as "
                             f"many KV heads, got {num_kv_heads}")
        attn = self.attention(layer)
        attn.num_attention_heads = num_heads
        attn.all_head_size = num_heads * attn.attention_head_size

    def check_geometry(self) -> None:
        if getattr(self.config, "is_decoder", False) or getattr(
                self.config, "add_cross_attention", False):
            raise ValueError("BERT used as a decoder (is_decoder / add_cross_attention) is not "
                             "supported: slimops prunes BERT-style encoders only")
        super().check_geometry()
