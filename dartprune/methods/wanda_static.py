"""`wanda-static`: one calibrated mask for every prompt, from Wanda's |W| x ||X|| summed over every weight of a
neuron (`calibration.wanda_scores`), with the norms measured once on a calibration text.

Budgets are uniform or DART-allocated (`config.allocation`); DART allocation uses the layer importance measured
on the calibration text, not the prompt's, so the mask is the same for every prompt and never changes."""
from __future__ import annotations

import torch
from torch import nn

from dartprune.architectures import FFNParts
from dartprune.calibration.file import load_calibration, wanda_scores
from dartprune.methods.base import Method, register_method


@register_method
class WandaStatic(Method):
    name = "wanda-static"
    description = "calibrated static mask: Wanda |W| x ||X|| summed per neuron over a calibration text"
    calibration = "wanda-static"
    trace = None
    reads_trace = False

    def __init__(self, config, parts: list[FFNParts], model: nn.Module):
        super().__init__(config, parts, model)
        calibration = load_calibration(config.calibration_file)
        calibration.check(model, self.name, parts)
        self._scores = [wanda_scores(p, *calibration.wanda_norms(i)) for i, p in enumerate(parts)]
        self._importance = calibration.importance(config.importance)

    def neuron_scores(self, layer: int, traced: torch.Tensor | None, size: int) -> torch.Tensor:
        return self._scores[layer]

    def layer_importance(self, importance: torch.Tensor) -> torch.Tensor:
        return self._importance.to(importance.device, importance.dtype).expand(importance.shape[0], -1)
