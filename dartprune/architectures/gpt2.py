"""GPT-2: non-gated MLP of Conv1D modules, which store weights as [in, out]."""
from __future__ import annotations

from torch import nn

from dartprune.architectures.base import Adapter, FFNParts, register_adapter


@register_adapter
class GPT2Adapter(Adapter):
    model_types = ("gpt2",)

    def layers(self) -> list[nn.Module]:
        return list(self.model.transformer.h)

    def ffn(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def set_ffn(self, layer: nn.Module, module: nn.Module) -> None:
        layer.mlp = module

    def ffn_parts(self, layer: nn.Module) -> FFNParts:
        mlp = layer.mlp
        return FFNParts(gate=None, up=mlp.c_fc.weight.t(), up_bias=mlp.c_fc.bias,
                        down=mlp.c_proj.weight.t(), down_bias=mlp.c_proj.bias, act=mlp.act)

    def down_proj(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.c_proj

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def ffn_input_norm(self, layer: nn.Module) -> nn.Module | None:
        return layer.ln_2
