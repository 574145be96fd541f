"""`threshold`: TEAL/CATS-style per-token activation sparsity. In layer l, activation u_{t,i} is zeroed when
|u_{t,i}| < tau_l, with tau_l calibrated offline so that a fraction `sparsity` of the activations of layer l on the
calibration text falls below it. Which neurons run changes with every token, so it runs on the mask path only (u
is computed in full, then thresholded): it saves no FLOPs here and is the token-level quality reference. The
executed sparsity in the stats is the fraction actually zeroed."""
from __future__ import annotations

import torch
from torch import nn

from dartprune.architectures import FFNParts
from dartprune.calibration.file import load_calibration
from dartprune.methods.base import Method, register_method


@register_method
class Threshold(Method):
    name = "threshold"
    description = "TEAL/CATS-style per-token |u| threshold per layer, calibrated offline (mask path only)"
    calibration = "threshold"
    trace = None
    reads_trace = False
    allocation = "uniform"
    execution = "per-token"

    def __init__(self, config, parts: list[FFNParts], model: nn.Module):
        super().__init__(config, parts, model)
        calibration = load_calibration(config.calibration_file)
        calibration.check(model, self.name, parts)
        taus = calibration.thresholds(config.sparsity)
        self._taus = [taus[i].clone() for i in range(taus.numel())]

    def active(self, layer: int, u: torch.Tensor) -> torch.Tensor:
        return u.abs() >= self._taus[layer]
