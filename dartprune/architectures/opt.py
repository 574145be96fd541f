"""OPT: the decoder layer calls fc1, activation_fn and fc2 itself, with no MLP module.

The adapter presents them as one module, `OPTFFN`, and installs a replacement by putting it in fc1's place and
identities in the other two, so the layer's own forward computes the replacement's output. Like every adapter
method but `set_ffn`, `ffn`, `ffn_parts` and `down_proj` read the layer as the model built it (before install).
OPT flattens the FFN input to [batch * tokens, hidden].
"""
from __future__ import annotations

import torch
from torch import nn

from dartprune.architectures.base import Adapter, FFNParts, register_adapter


class OPTFFN(nn.Module):
    """fc2(act(fc1(x))): OPT's FFN as a module, computed exactly as the layer computes it."""

    def __init__(self, fc1: nn.Module, act: nn.Module, fc2: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@register_adapter
class OPTAdapter(Adapter):
    model_types = ("opt",)

    def layers(self) -> list[nn.Module]:
        return list(self.model.model.decoder.layers)

    def ffn(self, layer: nn.Module) -> nn.Module:
        return OPTFFN(layer.fc1, layer.activation_fn, layer.fc2)

    def set_ffn(self, layer: nn.Module, module: nn.Module) -> None:
        if isinstance(module, OPTFFN):
            layer.fc1, layer.activation_fn, layer.fc2 = module.fc1, module.act, module.fc2
        else:
            layer.fc1, layer.activation_fn, layer.fc2 = module, nn.Identity(), nn.Identity()

    def ffn_parts(self, layer: nn.Module) -> FFNParts:
        return FFNParts(gate=None, up=layer.fc1.weight, up_bias=layer.fc1.bias, down=layer.fc2.weight,
                        down_bias=layer.fc2.bias, act=layer.activation_fn)

    def down_proj(self, layer: nn.Module) -> nn.Module:
        return layer.fc2

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def ffn_input_norm(self, layer: nn.Module) -> nn.Module | None:
        return layer.final_layer_norm if layer.do_layer_norm_before else None

    def to_embedding_space(self, columns: torch.Tensor) -> torch.Tensor:
        project = self.model.model.decoder.project_out
        return columns if project is None else project.weight.to(columns.dtype) @ columns
