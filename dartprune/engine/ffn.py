"""The FFN that replaces each layer's own: dense while tracing, then pruned, either through compact weights
(only the kept neurons, gathered into smaller contiguous matrices: real FLOP, byte and time savings) or through
a 0/1 mask on the dense activations (the reference path, and per-row masks for batches)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dartprune.architectures import FFNParts

if TYPE_CHECKING:
    from dartprune.engine.handle import DartHandle as Runtime


class CompactWeights:
    """One layer's kept neurons in slots: gate and up fused into one [2k, hidden] matrix (gated families),
    down as [hidden, k]. A re-trace rewrites only the slots whose neuron changed."""

    @torch.no_grad()
    def __init__(self, parts: FFNParts, kept: torch.Tensor):
        self.parts = parts
        self.slots = kept.clone()
        k = kept.numel()
        rows = torch.cat([parts.gate[kept], parts.up[kept]]) if parts.gated else parts.up[kept]
        self.w_in = rows.contiguous()
        self.b_in = parts.up_bias[kept].clone() if parts.up_bias is not None else None
        self.w_out = parts.down[:, kept].contiguous()
        self.k = k

    @torch.no_grad()
    def update(self, kept: torch.Tensor) -> int:
        """Swap in the new kept set, copying only entering neurons into the slots of leaving ones."""
        new = kept[~torch.isin(kept, self.slots)]
        free = (~torch.isin(self.slots, kept)).nonzero().flatten()
        if new.numel():
            parts = self.parts
            self.w_in[free] = parts.gate[new] if parts.gated else parts.up[new]
            if parts.gated:
                self.w_in[free + self.k] = parts.up[new]
            if self.b_in is not None:
                self.b_in[free] = parts.up_bias[new]
            self.w_out[:, free] = parts.down[:, new]
            self.slots[free] = new
        return int(new.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.w_in, self.b_in)
        if self.parts.gated:
            gate, up = hidden.split(self.k, dim=-1)
            u = self.parts.act(gate) * up
        else:
            u = self.parts.act(hidden)
        return F.linear(u, self.w_out, self.parts.down_bias)

    def nbytes(self) -> int:
        tensors = [self.w_in, self.w_out, self.slots] + ([self.b_in] if self.b_in is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def activations(parts: FFNParts, x: torch.Tensor) -> torch.Tensor:
    """u for inputs x with the full weights."""
    pre = F.linear(x, parts.up, parts.up_bias)
    return parts.act(F.linear(x, parts.gate)) * pre if parts.gated else parts.act(pre)


def masked_ffn(parts: FFNParts, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference path: the dense FFN with the activations of pruned neurons multiplied by 0."""
    return F.linear(activations(parts, x) * mask, parts.down, parts.down_bias)


class PrunedFFN(nn.Module):
    """Stands in for a layer's FFN module; asks the runtime which path this forward takes."""

    def __init__(self, index: int, original: nn.Module, parts: FFNParts, runtime: Runtime):
        super().__init__()
        self.index = index
        self.original = original
        self.parts = parts
        self.runtime = runtime
        self.compact: CompactWeights | None = None
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        x3 = x.reshape(rt.batch, rt.tokens, x.shape[-1])
        rt.remember_ffn_input(self.index, x3)
        path = rt.path_for(self.index)
        if path == "dense":
            y = self.original(x)
            if rt.tracing:
                rt.record_ffn_output(self.index, x3, y.reshape(x3.shape))
            return y
        if path == "compact":
            y = self.compact.forward(x3)
        elif path == "threshold":
            u = activations(self.parts, x3)
            y = F.linear(u * (u.abs() >= rt.thresholds[self.index]), self.parts.down, self.parts.down_bias)
        else:
            y = masked_ffn(self.parts, x3, self.mask)
        return y.reshape(*x.shape[:-1], y.shape[-1])
