"""What DART costs, as formulas of the model's sizes (docs/algorithm.md §6): one place, used by the engine's
statistics for the model it runs and by the benchmarks for shapes too large to run here (Llama-3.1-8B).

FLOPs count multiply-adds as two. State is what a sequence holds beyond the model and the KV cache; pruning
itself needs no copy of the weights (the kept neurons are a prefix of the layer's own weights, permuted in place),
so the permutation is counted as state and no weights are.
"""
from __future__ import annotations

INDEX_BYTES = 4   # neuron ids (the permutation, kept sets) are int32
SCORE_BYTES = 4   # scores and drift signals are float32


def dense_flops_per_token(layer_params: int, output_embedding_params: int) -> float:
    """A dense decode step: every weight of the decoder layers and the output projection once."""
    return 2.0 * (layer_params + output_embedding_params)


def tracing_flops(tokens: int, sizes: list[int], hidden: int) -> float:
    """Accumulating sum u^2 per neuron, and the layer-importance reductions over h and f, per traced token."""
    return tokens * sum(3.0 * size + 12.0 * hidden for size in sizes)


def monitoring_flops(tokens: int, monitored: int, hidden: int, window: int) -> float:
    """Summing each token's attention output into its window, and one cosine per window of W tokens."""
    return tokens * monitored * hidden * (1 + 3 / window)


def retrace_flops(tokens: int, sizes: list[int], hidden: int, gated: bool) -> float:
    """Scoring `tokens` buffered tokens: their full gate (and up) activations in every re-scored layer."""
    return tokens * sum(size * (2.0 * hidden * (2 if gated else 1) + 5.0) for size in sizes)


def retrace_neurons(tokens: int, sizes: list[int], gated: bool) -> float:
    """Scoring `tokens` buffered tokens counted in neuron executions (one neuron's products for one token): each
    neuron's gate and up products, two of a gated neuron's three (one of two without a gate). This is what a
    re-trace from the ring weighs against executed sparsity, next to a re-trace that runs tokens dense."""
    return tokens * sum(sizes) * (2 / 3 if gated else 1 / 2)


def state_bytes(sizes: list[int], hidden: int, ring_size: int, monitored: int, window: int,
                weight_bytes: int, ring: bool) -> dict[str, int]:
    """One sequence's DART state by part: the ring buffer (FFN inputs in the model's dtype, monitored attention
    outputs in float32) when the method re-traces; scores; the neuron order of each layer (whose prefix is the
    kept set); the drift reference and the window being collected (at most W - 1 tokens)."""
    layers = len(sizes)
    parts = {
        "ring_ffn_inputs": layers * ring_size * hidden * weight_bytes if ring else 0,
        "ring_attention": monitored * ring_size * hidden * SCORE_BYTES if ring else 0,
        "scores": sum(sizes) * SCORE_BYTES,
        "neuron_order": sum(sizes) * INDEX_BYTES,
        "drift": monitored * hidden * SCORE_BYTES * window if ring else 0,
    }
    parts["total"] = sum(parts.values())
    return parts
