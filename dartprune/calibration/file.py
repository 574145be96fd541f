"""The calibration file of the two calibrated baselines (docs/algorithm.md, Baselines): `wanda-static` and `threshold`;
its statistics are collected by `dartprune.calibration.collect`.

DART itself needs no calibration; these baselines do, and their statistics come from the dense model run over a
calibration text (by default 128 windows of 512 tokens of Moby Dick, which only the drift and conversation
benchmarks read: eval refuses to score a calibrated method on the texts its file was made from). The result is
one small safetensors file: per-layer tensors plus a JSON header (under the metadata key "dartprune") naming the
method, the model's identity (family, sizes and a fingerprint of its weights), the calibration text's name and
sha256, the number of windows and their length. The methods load the file when they are built and refuse one made
for another model or another method.

Statistics, all accumulated in float32 over every calibration token (no padding: all windows are full):
- wanda-static: `x_norm.{l}` [hidden]: ||X_j||, the L2 norm over tokens of FFN input channel j (the input of
  W_gate/W_up/W_1, after the layer's norm); `u_norm.{l}` [I_l]: ||u_i||, the L2 norm over tokens of neuron i's
  activation (the input of W_down/W_2); `importance.residual` and `importance.ffn-vs-input` [L]: the layer
  importance S_l of docs/algorithm.md §2 averaged over the calibration tokens, so DART-style budgets are calibrated too
  and the mask is the same for every prompt.
- threshold: `thresholds` [S, L]: per sparsity s of `sparsities` [S] and layer l, tau such that a fraction s of
  the |u| values of layer l on the calibration text is below tau (read from a log2 histogram of |u| with 256
  bins per octave, interpolated in the bin: no sort or quantile over 10^8 values); `zero_fraction` [L]: the
  fraction of exact zeros (ReLU families: a threshold cannot zero fewer than these).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dartprune.architectures import FFNParts, get_adapter

FORMAT = "dartprune-calibration"
VERSION = 1
DEFAULT_TEXT = "gutenberg:melville-moby_dick"
DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
DEFAULT_SPARSITIES = tuple(round(0.05 * i, 2) for i in range(20))  # 0.00, 0.05, ..., 0.95
# |u| histogram: log2 range and resolution (2^(1/256) = 0.27% wide bins from 3.6e-15 to 65536)
HIST_LOW, HIST_HIGH, BINS_PER_OCTAVE = -48.0, 16.0, 256
HIST_BINS = int((HIST_HIGH - HIST_LOW) * BINS_PER_OCTAVE)
_FINGERPRINT_POINTS = 16
_SPARSITY_TOLERANCE = 1e-6


class CalibrationError(ValueError):
    """A calibration file is missing, malformed, or made for another model, method or sparsity."""


def check_sources_differ(calibration: Calibration, sources: dict[str, str | None]) -> None:
    """Raise CalibrationError if the calibration was made from one of `sources` (text name -> sha256 where
    known): calibration and evaluation texts must differ. A source with a sha256 is matched by its content (two
    files may share a name), one without by its name (`gutenberg:NAME`, `wikitext2`, ...)."""
    made_from = calibration.meta["text"]
    for name, sha256 in sources.items():
        if sha256 == made_from["sha256"] if sha256 is not None else name == made_from["name"]:
            raise CalibrationError(f"{name} is the calibration text of {calibration.path}; evaluate on another "
                                   "text or calibrate on one that no evaluation reads")


# ----------------------------------------------------------------------------------------------- model identity
def model_identity(model: nn.Module, parts: list[FFNParts] | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """(structure, fingerprint): family and sizes, and 16 weights sampled from every FFN matrix and the embedding.

    `parts` may be given when the model's FFNs are already replaced (an attached handle has them).
    """
    adapter = get_adapter(model)
    if parts is None:
        parts = [adapter.ffn_parts(layer) for layer in adapter.layers()]
    matrices = [m for p in parts for m in (p.gate, p.up, p.down) if m is not None]
    matrices.append(model.get_input_embeddings().weight)
    with torch.no_grad():
        fingerprint = torch.cat([_sample(m) for m in matrices])
    structure = {
        "model_type": model.config.model_type,
        "num_layers": len(parts),
        "hidden_size": int(parts[0].up.shape[1]),
        "intermediate_sizes": [p.intermediate_size for p in parts],
        "gated": parts[0].gated,
        # informative: a hash of the sampled weights rounded to bfloat16 (the check itself compares the values)
        "weights_sha256": hashlib.sha256(fingerprint.bfloat16().view(torch.int16).numpy().tobytes()).hexdigest(),
        # the model's name, never a machine path: a local folder is recorded by its last component
        "name_or_path": _model_name(str(getattr(model.config, "name_or_path", "") or "")),
    }
    return structure, fingerprint


def _model_name(name_or_path: str) -> str:
    path = Path(name_or_path)
    return path.name if path.is_absolute() or path.exists() else name_or_path


def _sample(matrix: torch.Tensor) -> torch.Tensor:
    rows, cols = matrix.shape
    r = torch.linspace(0, rows - 1, _FINGERPRINT_POINTS).round().long()
    c = (r * 7919 + 13) % cols
    return matrix[r.to(matrix.device), c.to(matrix.device)].detach().float().cpu()


def histogram_quantiles(hist: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """tau per fraction q such that a fraction q of the counted |u| lies below tau, from the log2 histogram
    (linear interpolation of log2 tau inside the bin; q = 0 gives tau = 0, which zeroes nothing)."""
    cumulative = hist.double().cumsum(0)
    total = cumulative[-1]
    width = (HIST_HIGH - HIST_LOW) / HIST_BINS
    taus = []
    for q in fractions.tolist():
        if q <= 0:
            taus.append(0.0)
            continue
        target = q * total
        k = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)).clamp(max=HIST_BINS - 1))
        below = float(cumulative[k - 1]) if k > 0 else 0.0
        inside = (target - below) / max(float(hist[k]), 1e-30)
        taus.append(2.0 ** (HIST_LOW + (k + min(max(inside, 0.0), 1.0)) * width))
    return torch.tensor(taus, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- the file
@dataclass
class Calibration:
    """A loaded calibration file."""

    path: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def text_sha256(self) -> str:
        return self.meta["text"]["sha256"]

    def check_use(self, method: str, sparsity: float | None = None) -> None:
        """Refuse (CalibrationError) a file made for another method, or one without thresholds for `sparsity`
        (threshold): what can be told before a model loads."""
        if self.method != method:
            raise CalibrationError(f"calibration file {self.path} was made for method {self.method!r}, not "
                                   f"{method!r}; make one with `dartprune calibrate --method {method}`")
        if sparsity is not None and "sparsities" in self.tensors:
            self.thresholds(sparsity)

    def check(self, model: nn.Module, method: str, parts: list[FFNParts] | None = None) -> None:
        """Refuse (CalibrationError) a file made for another method or another model."""
        self.check_use(method)
        structure, fingerprint = model_identity(model, parts)
        saved = self.meta["model"]
        for key in ("model_type", "num_layers", "hidden_size", "intermediate_sizes"):
            if saved[key] != structure[key]:
                raise CalibrationError(f"calibration file {self.path} was made for another model: {key} is "
                                       f"{saved[key]!r} there and {structure[key]!r} here")
        stored = self.tensors["fingerprint"]
        # bfloat16 models round the weights by <= 2^-9 relative: a looser check would still separate models
        if stored.shape != fingerprint.shape or not torch.allclose(stored, fingerprint, rtol=2 ** -7, atol=1e-6):
            raise CalibrationError(f"calibration file {self.path} was made for another model: same "
                                   f"{structure['model_type']} sizes but different weights (fingerprint "
                                   f"{saved['weights_sha256'][:12]} there, {structure['weights_sha256'][:12]} here)")

    # wanda-static
    def wanda_norms(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[f"x_norm.{layer}"], self.tensors[f"u_norm.{layer}"]

    def importance(self, variant: str) -> torch.Tensor:
        return self.tensors[f"importance.{variant}"]

    # threshold
    @property
    def sparsities(self) -> list[float]:
        return [round(float(s), 6) for s in self.tensors["sparsities"]]

    def thresholds(self, sparsity: float) -> torch.Tensor:
        """[L] per-layer tau for `sparsity`; refuses a sparsity the file was not calibrated for."""
        grid = self.tensors["sparsities"].double()
        match = ((grid - sparsity).abs() < _SPARSITY_TOLERANCE).nonzero().flatten()
        if match.numel() == 0:
            raise CalibrationError(f"calibration file {self.path} has no thresholds for sparsity {sparsity}; it "
                                   f"has {self.sparsities} (recalibrate with --sparsities including {sparsity})")
        return self.tensors["thresholds"][int(match[0])]


def save_calibration(path: str | Path, method: str, model: nn.Module, tensors: dict[str, torch.Tensor],
                     **meta: Any) -> Path:
    """Write `tensors` and the header (method, model identity, `meta`) as one safetensors file."""
    check_method(method)
    structure, fingerprint = model_identity(model)
    header = {"format": FORMAT, "version": VERSION, "method": method, "model": structure, **meta}
    out = {name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}
    out["fingerprint"] = fingerprint
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"dartprune": json.dumps(header)})
    return path


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} not found; make one with `dartprune calibrate`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a non-safetensors file
        raise CalibrationError(f"{path} is not a calibration file (not safetensors: {err})") from err
    try:
        meta = json.loads(metadata["dartprune"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CalibrationError(f"{path} is not a dartprune calibration file (no 'dartprune' header)") from err
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CalibrationError(f"{path}: unsupported calibration format {meta.get('format')!r} "
                               f"version {meta.get('version')!r} (this dartprune reads version {VERSION})")
    return Calibration(str(path), meta, tensors)


def calibrated_methods() -> list[str]:
    """The kinds of calibration file: one per method whose `calibration` names one (wanda-static, threshold)."""
    from dartprune.methods import METHODS     # the methods read these files: imported when asked, not at load
    return sorted({method.calibration for method in METHODS.values() if method.calibration is not None})


def check_method(method: str) -> None:
    if method not in calibrated_methods():
        raise ValueError(f"calibration is for methods {calibrated_methods()}, not {method!r}")


# ----------------------------------------------------------------------------------------------- scores
def wanda_scores(parts: FFNParts, x_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    """Wanda-style neuron score (float32, [I]), summing |W| x ||X|| over every weight of neuron i:

        s_i = sum_j |W_gate[i, j]| ||X_j|| + sum_j |W_up[i, j]| ||X_j|| + ||u_i|| sum_j |W_down[j, i]|

    where ||X_j|| is the norm over calibration tokens of FFN input channel j and ||u_i|| that of neuron i's
    activation (the input of W_down). Non-gated FFNs drop the W_gate term (W_up = W_1, W_down = W_2); biases are
    not weights of a channel and are left out.
    """
    device = parts.up.device
    x = x_norm.to(device=device, dtype=torch.float32)
    score = parts.up.float().abs() @ x
    if parts.gated:
        score += parts.gate.float().abs() @ x
    score += u_norm.to(device=device, dtype=torch.float32) * parts.down.float().abs().sum(dim=0)
    return score.cpu()
