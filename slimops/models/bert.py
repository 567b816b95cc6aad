"""BERT-style encoders (BertModel, and task-head models such as BertForMaskedLM).

Post-LayerNorm multi-head attention (every head is its own "KV group": k and v have one
head per query head), biases on every projection and a plain GELU FFN:

    attention.self.{query,key,value} -> attention.output.dense -> + residual, LayerNorm
    intermediate.dense -> GELU -> output.dense -> + residual, LayerNorm

Head pruning removes rows of query/key/value (and their biases) and columns of
attention.output.dense; HF's BertSelfAttention reshapes with -1 heads, so only its
`num_attention_heads` / `all_head_size` attributes need updating (remote_modeling).
"""

from .base import DecoderAdapter


class BertAdapter(DecoderAdapter):
    """Paths from remote_modeling.BERT_LIKE; adds BERT's own rules (MHA, encoder only)."""

    def set_layer_geometry(self, layer, num_heads: int, num_kv_heads: int) -> None:
        if num_heads != num_kv_heads:
            raise ValueError(
                f"BERT attention is multi-head: {num_heads} query heads need as "
                f"many KV heads, got {num_kv_heads}"
            )
        super().set_layer_geometry(layer, num_heads, num_kv_heads)

    def check_geometry(self) -> None:
        if getattr(self.config, "is_decoder", False) or getattr(
            self.config, "add_cross_attention", False
        ):
            raise ValueError(
                "BERT used as a decoder (is_decoder / add_cross_attention) is not "
                "supported: slimops prunes BERT-style encoders only"
            )
        super().check_geometry()
