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
    Tensors may be views (e.g. transposed Conv1D weights); the engine copies what it keeps.
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


class UnsupportedModelError(ValueError):
    """The model's family has no adapter."""


class Adapter(ABC):
    """Base adapter: subclasses name the modules of one family (or several with the same layout)."""

    model_types: ClassVar[tuple[str, ...]] = ()

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
        """[vocab, hidden] matrix that turns the last hidden state into logits."""
        return self.model.get_output_embeddings().weight


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
    return ADAPTERS[model_type](model)
