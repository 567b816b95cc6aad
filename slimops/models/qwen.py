"""Qwen2 (q/k/v biases) and Qwen3 (per-head q_norm/k_norm over head_dim, shared by all
heads, so head pruning leaves them untouched). Same module names as LLaMA."""
from . import register
from .base import DecoderAdapter


@register
class QwenAdapter(DecoderAdapter):
    model_types = ("qwen2", "qwen3")
