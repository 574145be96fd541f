"""Gemma 1/2/3 (GeGLU): the Llama MLP, plus Gemma 2/3's norms around the FFN."""
from __future__ import annotations

from torch import nn

from dartprune.architectures.base import register_adapter
from dartprune.architectures.llama import LlamaAdapter


@register_adapter
class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma", "gemma2", "gemma3_text")

    def ffn_input_norm(self, layer: nn.Module) -> nn.Module | None:
        return getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm

    def ffn_output_norm(self, layer: nn.Module) -> nn.Module | None:
        return getattr(layer, "post_feedforward_layernorm", None)
