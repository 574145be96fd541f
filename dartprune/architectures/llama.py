"""Llama layout: gate/up/down projections under `mlp`; shared by Mistral, Qwen2 and Qwen3."""
from __future__ import annotations

from torch import nn

from dartprune.architectures.base import Adapter, FFNParts, register_adapter


@register_adapter
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def layers(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    def ffn(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def set_ffn(self, layer: nn.Module, module: nn.Module) -> None:
        layer.mlp = module

    def ffn_parts(self, layer: nn.Module) -> FFNParts:
        mlp = layer.mlp
        return FFNParts(
            gate=mlp.gate_proj.weight,
            up=mlp.up_proj.weight,
            up_bias=None,
            down=mlp.down_proj.weight,
            down_bias=None,
            act=mlp.act_fn,
        )

    def down_proj(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.down_proj

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def ffn_input_norm(self, layer: nn.Module) -> nn.Module | None:
        return layer.post_attention_layernorm
