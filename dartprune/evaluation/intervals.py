"""Paired bootstrap intervals: every comparison of two methods resamples the same items for both."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def bootstrap(values: Sequence[Sequence[float]], statistic: Callable[..., float], samples: int = 2000,
              seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic(*columns)` on the items as they are, and the percentile interval over
    `samples` resamples of the items with replacement. `values` holds one column per method, aligned by item,
    so a resample keeps the pairs together."""
    columns = [torch.as_tensor(list(v), dtype=torch.float64) for v in values]
    count = columns[0].numel()
    if count == 0 or any(c.numel() != count for c in columns):
        raise ValueError("paired columns must be non-empty and of one length")
    estimate = statistic(*columns)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, count, (samples, count), generator=generator)
    stats = torch.tensor([statistic(*(c[d] for c in columns)) for d in draws], dtype=torch.float64)
    stats = stats[torch.isfinite(stats)]
    if stats.numel() == 0:
        return estimate, math.nan, math.nan
    tail = (1 - level) / 2
    return estimate, float(torch.quantile(stats, tail)), float(torch.quantile(stats, 1 - tail))


def ratio_of_geomeans(a: torch.Tensor, b: torch.Tensor) -> float:
    """Ratio of geometric-mean perplexities from per-item mean NLLs: exp(mean(a) - mean(b))."""
    return float(torch.exp(a.mean() - b.mean()))


def gap_recovered(method: torch.Tensor, static: torch.Tensor, dense: torch.Tensor) -> float:
    """The share of static's log-perplexity gap to dense that `method` closes (per-item mean NLLs; 1 = as good as
    dense, 0 = no better than static, negative = worse than static)."""
    gap = float((static - dense).mean())
    return float((static - method).mean()) / gap if gap > 0 else math.nan
