"""What a pruning method is: the parts that differ between DART and its baselines, each owned by the method.

The engine asks a method where neuron scores come from (what to trace and how to turn it into scores), how the
per-layer budgets are set, how it executes (a kept set per layer, or a decision per token), whether it follows
drift, and what calibration it needs. A new method is one file in this package with `@register_method`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from dartprune.architectures import FFNParts

if TYPE_CHECKING:
    from dartprune.engine.config import DartConfig

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` selectable as `DartConfig(method=cls.name)` everywhere (CLI, eval, bench)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


class Method:
    """Defaults describe a prompt-traced mask that never changes (the `static` baseline); a method overrides what
    it does differently."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    prunes: ClassVar[bool] = True
    # the `dartprune calibrate --method` file this method needs (config.calibration_file), or None
    calibration: ClassVar[str | None] = None
    # what tracing accumulates per neuron: "config" (DartConfig.score: "l2" or "ema"), "griffin", or None (the
    # method's scores do not come from the traced text)
    trace: ClassVar[str | None] = "config"
    # "config" (DartConfig.allocation) or "uniform"
    allocation: ClassVar[str] = "config"
    # "kept-set": one kept set per layer and row (compact weights for a batch of one, masks otherwise);
    # "per-token": the method decides for every token which neurons run (mask path only, see `active`)
    execution: ClassVar[str] = "kept-set"
    # watch the attention output for drift and re-trace (config.retrace says how)
    follows_drift: ClassVar[bool] = False
    # rebuild the masks from each new conversation turn (else the first turn's masks stay)
    follows_turns: ClassVar[bool] = False
    # its masks come from the traced prompt (scores or layer importance); False: they are built without it, so a
    # pruned prompt (prune_prefill) needs no dense tracing pass first
    reads_trace: ClassVar[bool] = True

    def __init__(self, config: DartConfig, parts: list[FFNParts], model: nn.Module):
        self.config = config

    def trace_kind(self) -> str | None:
        """The accumulation `scoring.squared_activations` uses while tracing, or None for no tracing."""
        return self.config.score if self.trace == "config" else self.trace

    def allocation_for(self) -> str:
        return self.config.allocation if self.allocation == "config" else self.allocation

    def neuron_scores(self, layer: int, traced: torch.Tensor | None, size: int) -> torch.Tensor:
        """Scores of one row's `size` neurons in `layer` ([size] float32), from its summed squared activations."""
        return traced.sqrt() if traced is not None else torch.zeros(size)

    def layer_importance(self, importance: torch.Tensor) -> torch.Tensor:
        """Layer importances S_l the budgets are allocated from ([batch, layers]); default: the traced text's."""
        return importance

    def active(self, layer: int, u: torch.Tensor) -> torch.Tensor:
        """Per-token execution only: which activations run ([..., I] bool) for activations `u`."""
        raise NotImplementedError(f"{self.name} executes a kept set, not per token")
