"""Pruning methods: DART and the baselines, each the small part that differs (where scores come from, how
budgets are set, when masks change). Everything else is the shared engine. Methods plug in through a registry."""
from __future__ import annotations

from typing import ClassVar

import torch

from dartprune.calibration import load_calibration, wanda_scores

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

    def layer_importance(self, importance: torch.Tensor) -> torch.Tensor:
        """Layer importances S_l the budgets are allocated from ([batch, layers]); default: the prompt's own."""
        return importance


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


@register_method
class WandaStatic(Method):
    """A calibrated static mask: Wanda's |W| x ||X||, summed over every weight of a neuron (see
    `calibration.wanda_scores` for the exact formula), with the norms measured once on a calibration text.

    Budgets are uniform or DART-allocated (`config.allocation`); DART allocation uses the layer importance
    measured on the calibration text, not the prompt's, so the mask is the same for every prompt and never
    changes during a generation.
    """

    name = "wanda-static"
    description = "calibrated static mask: Wanda |W| x ||X|| summed per neuron over a calibration text"
    trace_kind = None

    def setup(self, handle) -> None:
        calibration = load_calibration(self.config.calibration_file)
        calibration.check(handle.model, self.name, handle.parts)
        self._scores = [wanda_scores(parts, *calibration.wanda_norms(i)) for i, parts in enumerate(handle.parts)]
        self._importance = calibration.importance(self.config.importance)
        return None

    def neuron_scores(self, layer: int, traced: torch.Tensor | None, size: int) -> torch.Tensor:
        return self._scores[layer]

    def layer_importance(self, importance: torch.Tensor) -> torch.Tensor:
        return self._importance.to(importance.device, importance.dtype).expand(importance.shape[0], -1)


@register_method
class Threshold(Method):
    """TEAL/CATS-style per-token activation sparsity: in layer l, activation u_{t,i} is zeroed when
    |u_{t,i}| < tau_l, with tau_l calibrated offline so that a fraction `sparsity` of the activations of layer l
    on the calibration text falls below it. Which neurons run changes with every token, so it runs on the mask
    path only (u is computed in full, then thresholded): it saves no FLOPs here and is the token-level quality
    reference. Executed sparsity in `handle.stats()` is the fraction actually zeroed.
    """

    name = "threshold"
    description = "TEAL/CATS-style per-token |u| threshold per layer, calibrated offline (mask path only)"
    trace_kind = None
    uniform_budgets = True
    per_token = True

    def setup(self, handle) -> list[torch.Tensor]:
        calibration = load_calibration(self.config.calibration_file)
        calibration.check(handle.model, self.name, handle.parts)
        taus = calibration.thresholds(self.config.sparsity)
        return [taus[i].clone() for i in range(taus.numel())]


def make_method(config) -> Method:
    return METHOD_REGISTRY[config.method](config)
