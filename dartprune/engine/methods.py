"""Pruning methods: DART and the baselines, each the small part that differs (where scores come from, how
budgets are set, when masks change). Everything else is the shared engine. Methods plug in through a registry."""
from __future__ import annotations

from typing import ClassVar

import torch

METHOD_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHOD_REGISTRY[cls.name] = cls
    return cls


class Method:
    """Defaults describe DART; a baseline overrides what it does differently."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    prunes: ClassVar[bool] = True
    trace_kind: ClassVar[str | None] = "config"
    uniform_budgets: ClassVar[bool] = False
    follows_drift: ClassVar[bool] = False
    per_token: ClassVar[bool] = False

    def __init__(self, config) -> None:
        self.config = config

    def neuron_scores(self, layer: int, traced: torch.Tensor | None, size: int) -> torch.Tensor:
        """Scores of one row's `size` neurons in `layer` ([size] float32); `traced`: summed squared activations."""
        return traced.sqrt() if traced is not None else torch.zeros(size)

    def setup(self, handle) -> list[torch.Tensor] | None:
        """Load what the method needs before the first forward (per-layer thresholds for per-token methods)."""
        return None


@register_method
class Dense(Method):
    name = "dense"
    description = "the unpruned model, through the same code and stats"
    prunes = False
    trace_kind = None


@register_method
class Dart(Method):
    name = "dart"
    description = "prompt-traced neurons, sensitivity budgets, re-traced on attention drift (no calibration)"
    follows_drift = True


@register_method
class Static(Method):
    name = "static"
    description = "DART's prompt mask and budgets, kept for the whole generation (no calibration)"


@register_method
class Griffin(Method):
    name = "griffin"
    description = "GRIFFIN: per-token L2-normalised prompt activations, same keep fraction in every layer"
    trace_kind = "griffin"
    uniform_budgets = True


@register_method
class RandomMask(Method):
    name = "random"
    description = "uniformly random neurons per layer, seeded (the floor any method must beat)"
    trace_kind = None
    uniform_budgets = True

    def neuron_scores(self, layer: int, traced: torch.Tensor | None, size: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + layer)
        return torch.rand(size, generator=generator)


def make_method(config) -> Method:
    return METHOD_REGISTRY[config.method](config)
