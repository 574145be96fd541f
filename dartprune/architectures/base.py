"""What the engine needs to know about a model family, and the registry that finds it.

An adapter is the only place that knows module names. The engine sees a decoder as a list of layers, each with
an FFN it may replace, the FFN's weights as plain tensors, and two taps: the attention output (drift signal)
and the residual stream entering the FFN block (layer importance).
"""
from __future__ import annotations

from dataclasses import dataclass
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class FFNParts:
    """One layer's FFN as weights in the [out, in] layout, whatever the module stores.

    Gated: u = act(gate @ x) * (up @ x). Plain: u = act(up @ x + up_bias). Output: y = down @ u + down_bias.
    Tensors may be views (e.g. transposed Conv1D weights) of the module's own parameters: the engine permutes
    neurons in them in place (engine/weights.py), never copies them.
    """

    gate: torch.Tensor | None
    up: torch.Tensor
    up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def intermediate_size(self) -> int:
        return self.up.shape[0]


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer as dartprune's native decode loop runs it (Llama and Gemma layouts).

    Norm weights are applied as `x * w` (or `x * (1 + w)` when the decoder's `norm_offset` is 1) to the input
    normalised in float32. `post_attention_norm` / `post_ffn_norm` are Gemma 2/3's norms on the block outputs;
    `q_norm` / `k_norm` normalise each head before the rotary embedding (Qwen3, Gemma 3). `window`: sliding-window
    attention span (a query at position i sees keys j with i - j < window), None for full attention. `rope`:
    which rotary table the layer uses (a key of `Decoder.rotary`)."""

    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    ffn_norm: torch.Tensor
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attention_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None
    window: int | None = None
    rope: str = "default"


@dataclass(frozen=True)
class Decoder:
    """A whole decoder for the native loop: everything but the FFNs (which are `Adapter.ffn_parts`), read in
    place from the model's own parameters. `rotary(positions)` gives (cos, sin) per rope key, each
    [len(positions), head_dim] float32, computed by the model's own rotary module (so every RoPE scaling it
    knows is applied)."""

    embed: nn.Module                    # the input embedding module (applies Gemma's scale itself)
    layers: list[DecoderLayer]
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    norm_eps: float
    norm_offset: float
    attention_scale: float
    rotary: Callable[[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]
    attention_softcap: float | None = None
    final_softcap: float | None = None


class UnsupportedModelError(ValueError):
    """The model's family has no adapter."""


class Adapter(ABC):
    """Base adapter: subclasses name the modules of one family (or several with the same layout)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # trained with BOS first and much worse without it: every evaluation window starts with BOS (Gemma)
    bos_every_window: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    @abstractmethod
    def layers(self) -> list[nn.Module]:
        ...

    @abstractmethod
    def ffn(self, layer: nn.Module) -> nn.Module:
        """The module that maps the FFN input to the FFN output (what the engine replaces)."""
        ...

    @abstractmethod
    def set_ffn(self, layer: nn.Module, module: nn.Module) -> None:
        ...

    @abstractmethod
    def ffn_parts(self, layer: nn.Module) -> FFNParts:
        ...

    @abstractmethod
    def down_proj(self, layer: nn.Module) -> nn.Module:
        """The FFN's output projection: its input is the neuron activations u."""
        ...

    @abstractmethod
    def attention(self, layer: nn.Module) -> nn.Module:
        """Self-attention block whose output[0] is after o_proj and before the residual add."""
        ...

    @abstractmethod
    def ffn_input_norm(self, layer: nn.Module) -> nn.Module | None:
        """Module whose input is the residual stream h entering the FFN block (None: the FFN input is h)."""
        ...

    def ffn_output_norm(self, layer: nn.Module) -> nn.Module | None:
        """Module applied to the FFN output before the residual add (Gemma 2/3), else None."""
        return None

    def output_embeddings(self) -> torch.Tensor:
        """[vocab, embedding] matrix that turns the last hidden state (after `to_embedding_space`) into logits."""
        return self.model.get_output_embeddings().weight

    def to_embedding_space(self, columns: torch.Tensor) -> torch.Tensor:
        """Hidden-state columns ([hidden, n]) as the output embeddings see them: unchanged, except in a family that
        projects the last hidden state to a smaller embedding size first (OPT-350m's `project_out`)."""
        return columns

    def decoder(self) -> Decoder | None:
        """The decoder for dartprune's native decode loop, or None where the family runs on Hugging Face
        `generate` only."""
        return None


ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make `cls` the adapter for each of its `model_types`."""
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a loaded causal LM, or a clear error naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"dartprune has no adapter for {type(model).__name__} (model_type={model_type!r}). "
            f"Supported model types: {', '.join(supported_model_types())}."
        )
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no language-model head: dartprune prunes causal language models "
            "(load the model with AutoModelForCausalLM)")
    return ADAPTERS[model_type](model)
