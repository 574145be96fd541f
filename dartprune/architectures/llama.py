"""Llama layout: gate/up/down projections under `mlp`; shared by Mistral, Qwen2 and Qwen3."""
from __future__ import annotations

import torch
from torch import nn

from dartprune.architectures.base import Adapter, Decoder, DecoderLayer, FFNParts, register_adapter


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
        if any(getattr(proj, "bias", None) is not None for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise ValueError(f"this {self.model.config.model_type} model has FFN biases (mlp_bias=True), which "
                             "dartprune's Llama layout does not carry: its pruned and native forwards would drop them")
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

    # ----------------------------------------------------------------- the native decode loop
    norm_offset = 0.0

    def decoder(self) -> Decoder | None:
        config = self.model.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = [self.decoder_layer(layer) for layer in self.layers()]
        attention = self.layers()[0].self_attn
        return Decoder(embed=self.model.get_input_embeddings(), layers=layers, final_norm=self.model.model.norm.weight,
                       lm_head=self.model.get_output_embeddings().weight, heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim, norm_eps=self.model.model.norm.variance_epsilon
                       if hasattr(self.model.model.norm, "variance_epsilon") else self.model.model.norm.eps,
                       norm_offset=self.norm_offset, attention_scale=attention.scaling, rotary=self.rotary,
                       attention_softcap=getattr(config, "attn_logit_softcapping", None),
                       final_softcap=getattr(config, "final_logit_softcapping", None))

    def decoder_layer(self, layer: nn.Module) -> DecoderLayer:
        attn = layer.self_attn
        window = getattr(attn, "sliding_window", None)
        if self.model.config.model_type == "mistral":          # Mistral passes the config's window at call time
            window = getattr(self.model.config, "sliding_window", None)
        return DecoderLayer(
            input_norm=layer.input_layernorm.weight, q=attn.q_proj.weight, k=attn.k_proj.weight,
            v=attn.v_proj.weight, o=attn.o_proj.weight, q_bias=attn.q_proj.bias, k_bias=attn.k_proj.bias,
            v_bias=attn.v_proj.bias, o_bias=attn.o_proj.bias, ffn_norm=self.ffn_input_norm(layer).weight,
            q_norm=attn.q_norm.weight if hasattr(attn, "q_norm") else None,
            k_norm=attn.k_norm.weight if hasattr(attn, "k_norm") else None,
            post_attention_norm=self.post_attention_norm(layer), post_ffn_norm=self.post_ffn_norm(layer),
            window=window, rope=self.rope_key(layer))

    def post_attention_norm(self, layer: nn.Module) -> torch.Tensor | None:
        return None

    def post_ffn_norm(self, layer: nn.Module) -> torch.Tensor | None:
        return None

    def rope_key(self, layer: nn.Module) -> str:
        return "default"

    @torch.no_grad()
    def rotary(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        probe = torch.zeros(1, dtype=torch.float32, device=positions.device)
        cos, sin = self.model.model.rotary_emb(probe, positions[None])
        return {"default": (cos[0].float(), sin[0].float())}
