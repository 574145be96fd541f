"""Collecting the calibrated baselines' statistics: the dense model over windows of a calibration text, observed
through the same FFN taps the engine traces with (`dartprune.engine.taps`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from dartprune.engine.config import IMPORTANCES
from dartprune.calibration.file import (
    DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_SPARSITIES, HIST_BINS, HIST_HIGH,
    HIST_LOW, Calibration, check_method, histogram_quantiles, load_calibration, save_calibration,
)
from dartprune.data import Text
from dartprune.engine.budgets import layer_importance
from dartprune.engine.taps import FFNTaps
from dartprune.models import check_context


def text_windows(tokenizer, text: Text, samples: int, seq_len: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens, evenly spaced over the whole text and never overlapping ([N, T]).

    Each window starts with the special tokens the tokenizer puts at the start of a text (e.g. BOS for Gemma and
    Llama 3; none for SmolLM2), then continues with text tokens.
    """
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    head = list(tokenizer("", add_special_tokens=True).input_ids)
    body = seq_len - len(head)
    ids = _tokenize(tokenizer, text.text)
    if len(ids) < samples * body:
        raise ValueError(f"{text.name} has {len(ids)} tokens, fewer than {samples} windows x {body} text tokens")
    stride = (len(ids) - body) // (samples - 1) if samples > 1 else 0
    return torch.tensor([head + ids[k * stride:k * stride + body] for k in range(samples)], dtype=torch.long)


def _tokenize(tokenizer, text: str, chunk: int = 200_000) -> list[int]:
    """Token ids of a long text, tokenized in chunks cut at line ends (no over-length warnings)."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = len(text) if start + chunk >= len(text) else text.rfind("\n", start, start + chunk) + 1 or start + chunk
        ids += tokenizer(text[start:end], add_special_tokens=False).input_ids
        start = end
    return ids


# ----------------------------------------------------------------------------------------------- statistics
class _Collector:
    """Accumulates one method's statistics from what the FFN taps report of each dense forward."""

    def __init__(self, model: nn.Module, method: str):
        if getattr(model, "dartprune_handle", None) is not None:
            raise RuntimeError("calibrate the dense model: detach the dartprune handle first")
        self.method = method
        self.count = 0  # tokens seen
        self.taps = FFNTaps(model, self.report)
        self.taps.set_mode(dense=True, want_h=method == "wanda-static")
        num = len(self.taps.layers)
        self.x_sumsq: list[torch.Tensor | float] = [0.0] * num
        self.u_sumsq: list[torch.Tensor | float] = [0.0] * num
        self.importance = {v: torch.zeros(num, dtype=torch.float64) for v in IMPORTANCES}
        self.hist: list[torch.Tensor | float] = [0.0] * num
        self.zeros = torch.zeros(num, dtype=torch.float64)

    def report(self, i: int, x: torch.Tensor, u: torch.Tensor, h: torch.Tensor | None,
               f: torch.Tensor | None) -> None:
        u = u.float().reshape(-1, u.shape[-1])
        if self.method == "threshold":
            magnitude = u.abs()
            self.zeros[i] += float((magnitude == 0).sum())
            logs = magnitude.log2().clamp_(HIST_LOW, HIST_HIGH - 1e-3)
            self.hist[i] = self.hist[i] + torch.histc(logs, HIST_BINS, HIST_LOW, HIST_HIGH).double()
            return
        self.u_sumsq[i] = self.u_sumsq[i] + u.square().sum(0)
        x = x.float().reshape(-1, x.shape[-1])
        self.x_sumsq[i] = self.x_sumsq[i] + x.square().sum(0)
        shape = (1, x.shape[0], -1)       # every token of every row in one row: all windows are full
        valid = torch.ones(1, x.shape[0], dtype=torch.bool)
        for variant in IMPORTANCES:
            mean = layer_importance(h.reshape(shape), f.reshape(shape), valid, variant)[0]
            self.importance[variant][i] += float(mean) * x.shape[0]

    def remove(self) -> None:
        self.taps.remove()

    def tensors(self, sparsities: Iterable[float]) -> dict[str, torch.Tensor]:
        if self.method == "wanda-static":
            out = {f"x_norm.{i}": torch.as_tensor(s).sqrt().cpu() for i, s in enumerate(self.x_sumsq)}
            out |= {f"u_norm.{i}": torch.as_tensor(s).sqrt().cpu() for i, s in enumerate(self.u_sumsq)}
            out |= {f"importance.{v}": (imp / self.count).float() for v, imp in self.importance.items()}
            return out
        grid = torch.tensor(sorted(set(float(s) for s in sparsities)), dtype=torch.float64)
        taus = torch.stack([histogram_quantiles(h.cpu(), grid) for h in self.hist], dim=1)  # [S, L]
        totals = torch.stack([h.sum() for h in self.hist]).cpu()
        return {"sparsities": grid.float(), "thresholds": taus.float(), "zero_fraction": (self.zeros / totals).float()}


@torch.no_grad()
def collect_statistics(model: nn.Module, method: str, windows: torch.Tensor, batch_size: int = 8,
                       sparsities: Iterable[float] = DEFAULT_SPARSITIES, progress: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Run the dense model over `windows` ([N, T] token ids) and return the method's per-layer statistics."""
    check_method(method)
    collector = _Collector(model, method)
    device = next(model.parameters()).device
    batches = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"calibrating {method}", unit="batch")
    try:
        for start in batches:
            ids = windows[start:start + batch_size].to(device)
            collector.count += ids.numel()
            model.base_model(input_ids=ids, use_cache=False)  # no logits: the statistics end at the last FFN
    finally:
        collector.remove()
    return collector.tensors(sparsities)


def calibrate(model: nn.Module, tokenizer, method: str, text: Text, out: str | Path,
              samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 8,
              sparsities: Iterable[float] = DEFAULT_SPARSITIES, progress: bool = False,
              windows: torch.Tensor | None = None) -> Calibration:
    """Calibrate `method` for `model` on `samples` windows of `seq_len` tokens of `text` and write `out`.

    `windows` ([samples, seq_len] ids) replaces the tokenizer (tiny test models have no tokenizer); the text's
    name and sha256 are recorded either way.
    """
    check_method(method)
    sparsities = list(sparsities)
    if method == "threshold" and (not sparsities or not all(0.0 <= s < 1.0 for s in sparsities)):
        raise ValueError(f"sparsities must be in [0, 1), got {sparsities}")
    if Path(out).is_dir():
        raise ValueError(f"{out} is a folder; `out` names the calibration file to write")
    length = seq_len if windows is None else windows.shape[1]
    check_context(model, length, "calibration windows")
    if windows is None:
        windows = text_windows(tokenizer, text, samples, seq_len)
    samples, seq_len = windows.shape
    start = time.perf_counter()
    tensors = collect_statistics(model, method, windows, batch_size, sparsities, progress)
    seconds = time.perf_counter() - start
    meta: dict[str, Any] = {
        "text": {"name": text.name, "sha256": text.sha256},
        "samples": samples, "seq_len": seq_len, "tokens": samples * seq_len,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seconds": round(seconds, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if method == "threshold":
        meta["sparsities"] = [round(float(s), 6) for s in tensors["sparsities"]]
    save_calibration(out, method, model, tensors, **meta)
    return load_calibration(out)
