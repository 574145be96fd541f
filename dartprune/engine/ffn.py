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


def entering(old: torch.Tensor, new: torch.Tensor, size: int) -> torch.Tensor:
    """The neurons of `new` that are not in `old` (both index sets of a layer with `size` neurons), in the order
    of `new`. A boolean mask over the layer: torch.isin sorts, about 30x slower at this size."""
    was = torch.zeros(size, dtype=torch.bool)
    was[old] = True
    return new[~was[new]]


class CompactWeights:
    """One layer's kept neurons in slots, neuron-major so that a slot is one contiguous row everywhere: gate and
    up fused into one [2k, hidden] matrix (gated families), down stored transposed as [k, hidden]. A re-trace
    rewrites only the rows of the slots whose neuron changed."""

    @torch.no_grad()
    def __init__(self, parts: FFNParts, kept: torch.Tensor):
        self.parts = parts
        self.slots = kept.clone()
        k = kept.numel()
        self.k = k
        self.gated = parts.gated
        self.act = parts.act
        self.down_bias = parts.down_bias
        index = kept.to(parts.up.device)
        # index_select into preallocated buffers: about 3x faster than advanced indexing plus cat (this runs once
        # per sequence, inside the time to first token)
        self.w_in = torch.empty(2 * k if parts.gated else k, parts.up.shape[1], dtype=parts.up.dtype,
                                device=parts.up.device)
        if parts.gated:
            torch.index_select(parts.gate, 0, index, out=self.w_in[:k])
            torch.index_select(parts.up, 0, index, out=self.w_in[k:])
        else:
            torch.index_select(parts.up, 0, index, out=self.w_in)
        self.b_in = parts.up_bias.index_select(0, index) if parts.up_bias is not None else None
        self.w_down = parts.down.t().index_select(0, index)
        # w_in transposed once as a view, so each forward is one `mm` per matrix (F.linear on a [1, 1, H] input
        # dispatches through matmul, reshapes and a transpose first: about 6 extra ops per call). `update` writes
        # into w_in in place, so the view stays current.
        self.w_in_t = self.w_in.t()

    @torch.no_grad()
    def update(self, kept: torch.Tensor) -> int:
        """Swap in the new kept set, copying only entering neurons into the slots of leaving ones."""
        size = self.parts.intermediate_size
        new = entering(self.slots, kept, size)
        if not new.numel():
            return 0
        now_kept = torch.zeros(size, dtype=torch.bool)
        now_kept[kept] = True
        free = (~now_kept[self.slots]).nonzero().flatten()
        # whole rows gathered with index_select and written with index_copy_: a re-trace may rewrite every
        # layer, and row copies are several times faster than column ones (down is read as rows of its
        # transposed view, the fastest of the gathers measured for it)
        parts = self.parts
        device = self.w_in.device
        new_d, free_d = new.to(device), free.to(device)
        if parts.gated:
            self.w_in.index_copy_(0, free_d, parts.gate.index_select(0, new_d))
            self.w_in.index_copy_(0, free_d + self.k, parts.up.index_select(0, new_d))
        else:
            self.w_in.index_copy_(0, free_d, parts.up.index_select(0, new_d))
        if self.b_in is not None:
            self.b_in.index_copy_(0, free_d, parts.up_bias.index_select(0, new_d))
        self.w_down.index_copy_(0, free_d, parts.down.t().index_select(0, new_d))
        self.slots[free] = new
        return int(new.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two matmuls over the kept neurons. Every op here is paid once per layer per decoded token (about
        1-3 us each on a CPU, whatever the size), so the body is the minimum: 2-D `mm`, slices instead of
        `split`, the gate product written into the activation."""
        flat = x.reshape(-1, x.shape[-1])
        if self.b_in is None:
            hidden = torch.mm(flat, self.w_in_t)
        else:
            hidden = torch.addmm(self.b_in, flat, self.w_in_t)
        if self.gated:
            u = self.act(hidden[:, : self.k])
            u.mul_(hidden[:, self.k:])
        else:
            u = self.act(hidden)
        y = torch.mm(u, self.w_down) if self.down_bias is None else torch.addmm(self.down_bias, u, self.w_down)
        return y.view(*x.shape[:-1], y.shape[-1])

    def nbytes(self) -> int:
        tensors = [self.w_in, self.w_down, self.slots] + ([self.b_in] if self.b_in is not None else [])
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
        shaped = x.dim() == 3 and x.shape[0] == rt.batch and x.shape[1] == rt.tokens
        x3 = x if shaped else x.reshape(rt.batch, rt.tokens, x.shape[-1])
        rt.remember_ffn_input(self.index, x3)
        path = rt.path_for(self.index)
        if path == "compact":
            y = self.compact.forward(x3)
            return y if shaped else y.reshape(*x.shape[:-1], y.shape[-1])
        if path == "dense":
            y = self.original(x)
            if rt.tracing:
                rt.record_ffn_output(self.index, x3, y.reshape(x3.shape))
            return y
        if path == "threshold":
            u = activations(self.parts, x3)
            active = u.abs() >= rt.thresholds[self.index]
            rt.record_active(self.index, active)
            y = F.linear(u * active, self.parts.down, self.parts.down_bias)
        else:
            y = masked_ffn(self.parts, x3, self.mask)
        return y.reshape(*x.shape[:-1], y.shape[-1])
