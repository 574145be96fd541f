"""Neuron scores (docs/algorithm.md §1 and the baselines' variants), accumulated in float32 whatever the model dtype."""
from __future__ import annotations

import math

import torch

_EPS = 1e-12


def squared_activations(u: torch.Tensor, valid: torch.Tensor, kind: str, ema_decay: float = 0.9) -> torch.Tensor:
    """Per row, the sum over valid tokens of u^2 (what s_i is the square root of).

    u: [batch, tokens, I]; valid: [batch, tokens] bool. kind: "l2" (plain sum), "ema" (weights (1-g) g^(T-1-t),
    newest token heaviest), "griffin" (each token's u divided by its L2 norm first).
    """
    u = u.float()
    if kind == "griffin":
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    weights = valid.float()
    if kind == "ema":
        ages = valid.flip(1).cumsum(1).flip(1) - 1
        weights = weights * (1 - ema_decay) * ema_decay ** ages.clamp_min(0).float()
    # [b, 1, t] @ [b, t, I]: reads u^2 in its own layout (an einsum over t transposed it first)
    return torch.bmm(weights[:, None, :], u.square())[:, 0]


def top_neurons(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest of `scores` ([I]), ascending: `top_neurons_rows` for one row."""
    return top_neurons_rows(scores[None], [k])[0]


def top_neurons_rows(scores: torch.Tensor, ks: list[int]) -> list[torch.Tensor]:
    """For each row of `scores` ([rows, I]), the indices of its k highest scores (its own k), ascending; ties go to
    the lower index (a stable sort), and a NaN score counts as -inf, so a row keeps exactly k neurons and a NaN one
    only when no finite score is left. One sort of all the rows: a re-trace selects in every layer at once, where
    one selection per layer cost a dozen small ops each."""
    ranked = torch.sort(scores.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf), dim=-1,
                        descending=True, stable=True).indices
    return [ranked[r, :k].sort().values for r, k in enumerate(ks)]


def same_length_groups(rows: dict[int, torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """The keys of `rows` (1-D tensors) grouped by length, each group with its rows stacked: per-layer vectors (one
    per FFN) go through elementwise ops once per model instead of once per layer."""
    groups: dict[int, list[int]] = {}
    for key, row in rows.items():
        groups.setdefault(row.numel(), []).append(key)
    return [(keys, torch.stack([rows[key] for key in keys])) for keys in groups.values()]


@torch.no_grad()
def neuron_prior(down: torch.Tensor, output_embeddings: torch.Tensor, kind: str, chunk: int = 4096) -> torch.Tensor:
    """A static weight per neuron i multiplied into its score: the max ("vocab-max") or mean ("vocab-mean") over the
    vocabulary of |E_v . W_down[:, i]|, never building the I x V matrix."""
    down = down.float()
    result = torch.zeros(down.shape[1]) if kind == "vocab-mean" else torch.full((down.shape[1],), -1.0)
    for start in range(0, output_embeddings.shape[0], chunk):
        block = (output_embeddings[start:start + chunk].float() @ down).abs()
        if kind == "vocab-mean":
            result += block.sum(dim=0)
        else:
            result = torch.maximum(result, block.max(dim=0).values)
    return result / output_embeddings.shape[0] if kind == "vocab-mean" else result
