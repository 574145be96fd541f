"""Phi-3: gate and up fused in one `gate_up_proj` (gate first)."""
from __future__ import annotations

from torch import nn

from dartprune.architectures.base import FFNParts, register_adapter
from dartprune.architectures.llama import LlamaAdapter


@register_adapter
class Phi3Adapter(LlamaAdapter):
    model_types = ("phi3",)

    def ffn_parts(self, layer: nn.Module) -> FFNParts:
        mlp = layer.mlp
        weight = mlp.gate_up_proj.weight
        half = weight.shape[0] // 2
        gate, up = weight[:half], weight[half:]
        return FFNParts(gate=gate, up=up, up_bias=None, down=mlp.down_proj.weight, down_bias=None,
                        act=mlp.activation_fn)

    def decoder(self) -> None:
        """Fused q/k/v and gate/up: Hugging Face `generate` runs it."""
        return None
