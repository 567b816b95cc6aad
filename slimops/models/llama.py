"""LLaMA and Mistral: q/k/v/o + gate/up/down, optional attention bias, RMSNorm."""
from . import register
from .base import DecoderAdapter


@register
class LlamaAdapter(DecoderAdapter):
    model_types = ("llama", "mistral")
