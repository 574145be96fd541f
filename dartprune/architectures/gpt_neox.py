"""GPT-NeoX (Pythia): non-gated MLP with biases; the FFN reads the same residual as attention when
`use_parallel_residual`, which is exactly what `post_attention_layernorm` receives either way."""
from __future__ import annotations

from torch import nn

from dartprune.architectures.base import Adapter, FFNParts, register_adapter


@register_adapter
class GPTNeoXAdapter(Adapter):
    model_types = ("gpt_neox",)

    def layers(self) -> list[nn.Module]:
        return list(self.model.gpt_neox.layers)

    def ffn(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def set_ffn(self, layer: nn.Module, module: nn.Module) -> None:
        layer.mlp = module

    def ffn_parts(self, layer: nn.Module) -> FFNParts:
        mlp = layer.mlp
        return FFNParts(gate=None, up=mlp.dense_h_to_4h.weight, up_bias=mlp.dense_h_to_4h.bias,
                        down=mlp.dense_4h_to_h.weight, down_bias=mlp.dense_4h_to_h.bias, act=mlp.act)

    def down_proj(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.dense_4h_to_h

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attention

    def ffn_input_norm(self, layer: nn.Module) -> nn.Module | None:
        return layer.post_attention_layernorm
