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


def geometric_mean_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """Geometric mean of the per-item ratios a / b (positive values, e.g. paired timings)."""
    return float((a / b).log().mean().exp())


def gap_recovered(method: torch.Tensor, static: torch.Tensor, dense: torch.Tensor) -> float:
    """The share of static's log-perplexity gap to dense that `method` closes (per-item mean NLLs; 1 = as good as
    dense, 0 = no better than static, negative = worse than static)."""
    gap = float((static - dense).mean())
    return float((static - method).mean()) / gap if gap > 0 else math.nan


def paired_perplexities(parts: dict[str, dict[str, list[float]]]) -> list[dict]:
    """parts[part][label]: per-item mean NLLs of each method label ("dart@0.5", "dense"), aligned by item. Every
    method other than dense against static at the same sparsity (static itself only against dense) and against
    dense: the ratio of geometric-mean perplexities and the share of static's gap recovered, paired."""
    out = []
    labels = dict.fromkeys(label for by_label in parts.values() for label in by_label)
    for label in labels:
        method, _, sparsity = label.partition("@")
        if method == "dense":
            continue
        for part, by_label in parts.items():
            mine = by_label.get(label)
            if not mine:
                continue
            row: dict = {"method": label, "part": part, "items": len(mine)}
            static, dense = by_label.get(f"static@{sparsity}"), by_label.get("dense")
            if static is not None and method != "static":
                row["ppl_ratio_vs_static"] = bootstrap([mine, static], ratio_of_geomeans)
                if dense is not None:
                    row["gap_recovered"] = bootstrap([mine, static, dense], gap_recovered)
            if dense is not None:
                row["ppl_ratio_vs_dense"] = bootstrap([mine, dense], ratio_of_geomeans)
            out.append(row)
    return out
