"""Per-layer pruning budgets (docs/algorithm.md §2): sensitivity from the prompt's own prefill, depth protection,
clipping with the residual handed back, and keep counts that average to the requested sparsity."""
from __future__ import annotations

import torch

from dartprune.engine.config import DartConfig

_EPS = 1e-12


def importance_terms(h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The per-token dot products S_l is made of, [3, batch, tokens] in float32: <h, h>, <f, f>, <h, f>.

    h, f: [batch, tokens, hidden] (residual entering the FFN block, FFN output). Three dot products instead of
    cosine_similarity's normalised copies, and the rest of S_l left to `importance_from_terms`, which a prompt's
    forward runs once over every layer's terms: this is on the way to every prompt's first token."""
    h = h.float()
    f = f.float()
    return torch.stack(((h * h).sum(dim=-1), (f * f).sum(dim=-1), (h * f).sum(dim=-1)))


def importance_from_terms(terms: torch.Tensor, valid: torch.Tensor, variant: str = "residual") -> torch.Tensor:
    """S_l per row from `importance_terms` ([..., 3, batch, tokens] -> [..., batch]): the mean over valid tokens
    ([batch, tokens] bool) of (1 - cos(h, h + f)) * |f| / |h|. Variant "ffn-vs-input" compares h with f alone (the
    authors' code). |h + f|^2 = hh + 2 hf + ff loses precision only where the FFN output nearly cancels the
    residual stream (|h + f| << |h|), which a residual block does not do in practice."""
    hh, ff, hf = terms.unbind(dim=-3)
    h_norm = hh.sqrt()
    if variant == "residual":         # <h, h + f> and |h + f|
        dot, other_norm = hh + hf, (hh + 2 * hf + ff).clamp_min(0).sqrt()
    else:
        dot, other_norm = hf, ff.sqrt()
    cos = dot / (h_norm.clamp_min(_EPS) * other_norm.clamp_min(_EPS))
    ratio = ff.sqrt() / h_norm.clamp_min(_EPS)
    per_token = (1.0 - cos) * ratio * valid
    return per_token.sum(dim=-1) / valid.sum(dim=-1).clamp_min(1)


def layer_importance(h: torch.Tensor, f: torch.Tensor, valid: torch.Tensor, variant: str = "residual") -> torch.Tensor:
    """S_l per row ([batch]) of one layer: h, f [batch, tokens, hidden], valid [batch, tokens] bool."""
    return importance_from_terms(importance_terms(h, f), valid, variant)


def depth_protection(num_layers: int, config: DartConfig) -> torch.Tensor:
    """D_l: ramps from a (first layer) up to 1 over the first w_e of depth, and down to b over the last w_l."""
    z = torch.linspace(0.0, 1.0, num_layers, dtype=torch.float64) if num_layers > 1 else torch.zeros(1,
                                                                                                     dtype=torch.float64)
    d = torch.ones_like(z)
    early = z < config.early_width
    late = z > 1.0 - config.late_width
    d[early] = config.early_floor + (1 - config.early_floor) * z[early] / config.early_width
    d[late] = config.late_floor + (1 - config.late_floor) * (1 - z[late]) / config.late_width
    return d


def pruning_ratios(importance: torch.Tensor, sparsity: float, config: DartConfig) -> torch.Tensor:
    """p_l for one row: the allocation of docs/algorithm.md §2 (float64; mean equals `sparsity`)."""
    num_layers = importance.numel()
    if sparsity == 0.0:
        return torch.zeros(num_layers, dtype=torch.float64)
    if config.allocation == "uniform":
        return torch.full((num_layers,), float(sparsity), dtype=torch.float64)
    s = importance.double()
    span = s.max() - s.min()
    normalised = (s - s.min()) / span if span > _EPS else torch.zeros_like(s)
    weight = (1.0 - normalised) * depth_protection(num_layers, config)
    if weight.sum() <= _EPS:
        weight = torch.ones_like(weight)
    target = sparsity * num_layers
    lo, hi = min(config.p_min, sparsity), max(config.p_max, sparsity)
    p = (target * weight / weight.sum()).clamp(lo, hi)
    for _ in range(100):
        residual = target - p.sum()
        if abs(residual) < 1e-6:
            break
        free = (p < hi - 1e-12) if residual > 0 else (p > lo + 1e-12)
        share = weight * free
        if share.sum() <= _EPS:
            share = free.double()
        p = (p + residual * share / share.sum()).clamp(lo, hi)
    return p


def keep_counts(ratios: torch.Tensor, sizes: list[int]) -> list[int]:
    """k_l = round((1 - p_l) * I_l), at least one neuron per layer."""
    return [max(1, int(round((1.0 - float(p)) * size))) for p, size in zip(ratios, sizes)]
