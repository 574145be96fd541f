"""What pruning can buy at most, and what DART costs (docs/algorithm.md §6), from parameter counts.

Byte ceiling: decoding one token of a batch-1 sequence reads every weight once (attention, FFN, norms, the
output projection) plus one row of each embedding table. Pruning FFN neurons removes their rows of W_gate/W_up
and columns of W_down, so with keep counts k_l the bytes read per token shrink, and

    ceiling = bytes per token (dense) / bytes per token (pruned)

is the speedup a bandwidth-bound decode step could reach. The achieved share of the possible gain is
(speedup - 1) / (ceiling - 1). The KV cache read is left out of both (it grows with the context; it is reported
separately, and is small for the prompt lengths benchmarked here).

Overhead: the engine's own formulas (`dartprune.engine.costs`) for state bytes and overhead FLOPs, evaluated at a
model's shapes, so they can be given for a model too large to run here (Llama-3.1-8B).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dartprune.architectures import get_adapter
from dartprune.engine import costs
from dartprune.engine.config import DartConfig


@dataclass
class DecodeBytes:
    """Weight bytes read to decode one token, by part."""

    attention: int
    ffn: int
    norms: int
    lm_head: int
    embedding_rows: int
    other: int = 0

    @property
    def total(self) -> int:
        return self.attention + self.ffn + self.norms + self.lm_head + self.embedding_rows + self.other

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _unique_params(module: nn.Module) -> dict[int, nn.Parameter]:
    return {id(p): p for p in module.parameters()}


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def decode_bytes(model: nn.Module, keep_counts: list[int] | None = None) -> DecodeBytes:
    """Weight bytes read per decoded token; FFN neurons kept per layer from `keep_counts` (None: all).

    Works on a model with or without an attached handle (a `TappedFFN` holds the same parameters)."""
    adapter = get_adapter(model)
    layers = adapter.layers()
    if keep_counts is not None and len(keep_counts) != len(layers):
        raise ValueError(f"keep_counts has {len(keep_counts)} entries for {len(layers)} layers")
    attention = ffn = norms = 0
    seen: set[int] = set()
    for i, layer in enumerate(layers):
        parts = adapter.ffn_parts(layer)
        size = parts.intermediate_size
        keep = size if keep_counts is None else keep_counts[i]
        per_neuron = [parts.gate, parts.up, parts.up_bias, parts.down]
        ffn_full = sum(_nbytes(t) for t in per_neuron)
        ffn += ffn_full * keep // size + _nbytes(parts.down_bias)
        ffn_ids = {id(t) for t in per_neuron + [parts.down_bias] if t is not None}
        # FFN tensors may be views (Conv1D transposes, slices of a fused gate_up): match by memory overlap too
        ffn_spans = [_span(t) for t in per_neuron + [parts.down_bias] if t is not None]
        norm_ids = {id(p) for m in layer.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
        for pid, p in _unique_params(layer).items():
            seen.add(pid)
            if pid in ffn_ids or any(_overlaps(_span(p), span) for span in ffn_spans):
                continue
            if pid in norm_ids:
                norms += _nbytes(p)
            else:
                attention += _nbytes(p)
    head = adapter.output_embeddings()
    lm_head = _nbytes(head)
    seen.add(id(head))
    embedding_rows = other = 0
    embedding_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) and id(module.weight) not in seen:
            embedding_ids.add(id(module.weight))
            embedding_rows += module.weight.shape[1] * module.weight.element_size()
    if id(head) in {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}:
        embedding_rows += head.shape[1] * head.element_size()          # tied: the lookup still reads a row
    for pid, p in _unique_params(model).items():
        if pid in seen or pid in embedding_ids:
            continue
        seen.add(pid)
        other += _nbytes(p)                                              # final norm(s), projections
    return DecodeBytes(attention, ffn, norms, lm_head, embedding_rows, other)


def byte_ceiling(model: nn.Module, keep_counts: list[int]) -> float:
    """Dense bytes per decoded token over pruned bytes per decoded token."""
    return decode_bytes(model).total / decode_bytes(model, keep_counts).total


def share_of_gain(speedup: float | None, ceiling: float | None) -> float | None:
    """(speedup - 1) / (ceiling - 1); None when nothing is pruned (ceiling 1)."""
    if speedup is None or ceiling is None or ceiling <= 1.0 + 1e-9:
        return None
    return (speedup - 1.0) / (ceiling - 1.0)


@dataclass
class FixedCostFit:
    """Time per token = fixed + bytes / bandwidth, fitted by least squares over one loop's configurations.

    Under this model a pruned run's share of the possible gain is bytes_time / (fixed + bytes_time) of its own
    step, so it can reach 0.9 only while the fixed part (work that does not shrink with the FFN: attention over
    the cache, norms, per-op dispatch, the loop itself) stays under a ninth of the pruned bytes' time."""

    fixed_ms: float
    bandwidth_gb_s: float
    r_squared: float
    points: int

    def share_bound(self, pruned_bytes: float) -> float:
        """The share of gain this fit predicts at `pruned_bytes` per token."""
        moving = pruned_bytes / (self.bandwidth_gb_s * 1e6)
        return moving / (self.fixed_ms + moving)

    def fixed_ms_for_share(self, pruned_bytes: float, share: float = 0.9) -> float:
        """The fixed time per token at which the share at `pruned_bytes` would be `share`."""
        return pruned_bytes / (self.bandwidth_gb_s * 1e6) * (1 - share) / share


def fit_fixed_cost(bytes_per_token: list[float], ms_per_token: list[float]) -> FixedCostFit | None:
    """Least-squares line through (bytes, ms); None with fewer than two distinct byte counts or a slope <= 0."""
    x = torch.tensor(bytes_per_token, dtype=torch.float64)
    y = torch.tensor(ms_per_token, dtype=torch.float64)
    if x.numel() < 2 or float(x.max() - x.min()) <= 0:
        return None
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    if slope <= 0:
        return None
    fixed = float(ym) - slope * float(xm)
    residual = float(((y - (fixed + slope * x)) ** 2).sum())
    total = float(((y - ym) ** 2).sum())
    return FixedCostFit(fixed_ms=fixed, bandwidth_gb_s=1.0 / (slope * 1e6), r_squared=1.0 - residual / total
                        if total > 0 else 1.0, points=int(x.numel()))


def kv_cache_bytes(model: nn.Module, tokens: int) -> int:
    """Bytes of keys and values read by one decode step over a context of `tokens`."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    element = next(model.parameters()).element_size()
    return 2 * layers * kv * head_dim * tokens * element


# ----------------------------------------------------------------------------- shapes-only formulas
@dataclass(frozen=True)
class Shapes:
    """A gated decoder's sizes (Llama layout)."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> dict[str, int]:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return {"attention": attention, "ffn": 3 * self.hidden * self.intermediate, "norms": 2 * self.hidden}


LLAMA_3_1_8B = Shapes(layers=32, hidden=4096, intermediate=14336, vocab=128256, heads=32, kv_heads=8, dtype_bytes=2)


def shapes_decode_bytes(shapes: Shapes, keep: int | list[int] | None = None) -> DecodeBytes:
    """`decode_bytes` from shapes alone (keep: neurons kept per layer, one number or one per layer)."""
    per = shapes.layer_params()
    keeps = [shapes.intermediate] * shapes.layers if keep is None else (
        [keep] * shapes.layers if isinstance(keep, int) else list(keep))
    b = shapes.dtype_bytes
    return DecodeBytes(attention=per["attention"] * shapes.layers * b,
                       ffn=sum(3 * shapes.hidden * k for k in keeps) * b,
                       norms=per["norms"] * shapes.layers * b,
                       lm_head=shapes.vocab * shapes.hidden * b,
                       embedding_rows=shapes.hidden * b, other=shapes.hidden * b)


def dart_state_bytes(shapes: Shapes, config: DartConfig | None = None) -> dict[str, int]:
    """One sequence's DART state at these shapes and settings (default: DartConfig()), by the engine's own formula
    (`dartprune.engine.costs`)."""
    config = config or DartConfig()
    return costs.state_bytes([shapes.intermediate] * shapes.layers, shapes.hidden, config.ring_size,
                             len(config.monitored_layers), config.window, shapes.dtype_bytes, ring=True)


def overhead_flops(shapes: Shapes, prompt_tokens: int, new_tokens: int, retraces: int = 0,
                   config: DartConfig | None = None) -> dict[str, float]:
    """Tracing + monitoring + re-trace FLOPs over the dense forward FLOPs of the same tokens, at these settings
    (default: DartConfig()), by the engine's formulas (`dartprune.engine.costs`)."""
    config = config or DartConfig()
    per = shapes.layer_params()
    sizes = [shapes.intermediate] * shapes.layers
    dense_per_token = costs.dense_flops_per_token((per["attention"] + per["ffn"] + per["norms"]) * shapes.layers,
                                                  shapes.vocab * shapes.hidden)
    tracing = costs.tracing_flops(prompt_tokens, sizes, shapes.hidden)
    monitoring = costs.monitoring_flops(new_tokens, len(config.monitored_layers), shapes.hidden, config.window)
    per_retrace = costs.retrace_flops(config.ring_size, sizes, shapes.hidden, gated=True)
    dense = (prompt_tokens + new_tokens) * dense_per_token
    return {"tracing": tracing, "monitoring": monitoring, "retrace": retraces * per_retrace, "dense": dense,
            "fraction": (tracing + monitoring + retraces * per_retrace) / dense,
            "fraction_per_retrace": per_retrace / dense,
            "retrace_in_dense_tokens": per_retrace / dense_per_token}
