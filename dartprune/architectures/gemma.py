"""Gemma 1/2/3 (GeGLU): the Llama MLP, plus Gemma 2/3's norms around the FFN."""
from __future__ import annotations

import torch
from torch import nn

from dartprune.architectures.base import register_adapter
from dartprune.architectures.llama import LlamaAdapter


@register_adapter
class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma", "gemma2", "gemma3_text")
    bos_every_window = True

    def ffn_input_norm(self, layer: nn.Module) -> nn.Module | None:
        return getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm

    def ffn_output_norm(self, layer: nn.Module) -> nn.Module | None:
        return getattr(layer, "post_feedforward_layernorm", None)

    # ----------------------------------------------------------------- the native decode loop
    norm_offset = 1.0      # Gemma's RMSNorm multiplies by (1 + w)

    def post_attention_norm(self, layer: nn.Module) -> torch.Tensor | None:
        """Gemma 2/3 norm the attention output with post_attention_layernorm (their FFN input norm is
        pre_feedforward_layernorm); Gemma 1 uses post_attention_layernorm as its FFN input norm."""
        return layer.post_attention_layernorm.weight if hasattr(layer, "pre_feedforward_layernorm") else None

    def post_ffn_norm(self, layer: nn.Module) -> torch.Tensor | None:
        norm = getattr(layer, "post_feedforward_layernorm", None)
        return norm.weight if norm is not None else None

    def rope_key(self, layer: nn.Module) -> str:
        return layer.self_attn.layer_type if self._per_type_rope() else "default"

    def _per_type_rope(self) -> bool:
        return self.model.config.model_type == "gemma3_text"

    @torch.no_grad()
    def rotary(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if not self._per_type_rope():
            return super().rotary(positions)
        probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
        tables = {}
        for layer_type in sorted(set(self.model.config.layer_types)):
            cos, sin = self.model.model.rotary_emb(probe, positions[None], layer_type)
            tables[layer_type] = (cos[0].float(), sin[0].float())
        return tables
