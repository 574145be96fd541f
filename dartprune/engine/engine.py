"""The DART engine: per-sequence state and the step API a decode loop drives.

A decode loop (Hugging Face `generate` through `attach`, or dartprune's native loop) calls, around every forward:

    engine.start(batch)                  a new sequence (its first forward is the prompt)
    step = engine.begin_forward(valid)   what this forward must do: run dense and trace, or run pruned
    ...  for each layer: engine.trace(layer, x, u, h, f) after a dense FFN, or y = engine.ffn(layer, x)
    ...  for each monitored layer (step.monitor): engine.observe_attention(j, a)
    engine.end_forward()                 account; build masks; watch drift; re-trace

and may call `new_turn()` before a forward that brings a new conversation turn, `retrace(row)` to force a
re-trace, `stats()` at any time, `end_sequence()` when a sequence will not go on (its weights go back into their
original order then rather than at the next `start`, off the next prompt's first token) and `close()` at the end
(which puts the weights back exactly as they were).

The engine owns: the method, one `PrefixFFN` per layer (the model's own weights, permuted in place so the kept
neurons come first), and the sequence (rows, ring buffer). Nothing else holds pruning state.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from dartprune.architectures import get_adapter
from dartprune.engine import costs
from dartprune.engine.budgets import importance_from_terms, importance_terms, keep_counts, pruning_ratios
from dartprune.engine.config import ConfigError, DartConfig, monitored_layer_indices
from dartprune.engine.drift import Detector, make_detector
from dartprune.engine.phase import Event, Phase, next_phase
from dartprune.engine.ring import Ring
from dartprune.engine.scoring import neuron_prior, same_length_groups, squared_activations, top_neurons_rows
from dartprune.engine.stats import RetraceRecord, SequenceStats
from dartprune.engine.weights import (ModuleFFN, PrefixFFN, activations, masked_ffn, offloaded, own_pages,
                                     swap_library, to_neuron_major, to_row_major, transposed_parameters)
from dartprune.methods import get_method

# per down projection module (hashed by identity: a tensor key would be compared by value), kept while it lives
_PRIOR_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()
# the engine that has permuted a model's weights, until it closes: a second one would read them in the wrong order
_PRUNING: weakref.WeakKeyDictionary[nn.Module, Engine] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Step:
    """What one forward must do, as `begin_forward` decided it."""

    dense: bool                   # run every FFN dense and report it with `trace`
    importance: bool              # `trace` needs h and f too (layer budgets are being measured)
    monitor: tuple[int, ...]      # layers whose attention output to report with `observe_attention`
    batch: int
    tokens: int
    on_masks: tuple[int, ...] = ()   # rows of a dense forward that do not trace: their FFN outputs come from
                                     # their masks (`rows_on_masks`), as in a pruned forward


@dataclass
class _Trace:
    """What one row has traced since it entered TRACING: per layer sum u^2 (in the layer's current neuron order),
    layer-importance sums, and the monitored attention outputs (the drift baseline's tokens)."""

    sumsq: dict[int, torch.Tensor] = field(default_factory=dict)
    importance: dict[int, float] = field(default_factory=dict)
    tokens: int = 0
    signal: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Row:
    """One sequence of the batch."""

    phase: Phase
    target: int                    # tokens to trace before the masks are (re)built
    drift: Detector
    reason: Event | None = None    # why the row traces now (None: its first prompt)
    trace: _Trace = field(default_factory=_Trace)
    built: bool = False
    keep: list[int] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    kept: list[torch.Tensor | None] = field(default_factory=list)  # per layer, the mask path's kept ids (a batch of
    pending: list[int] = field(default_factory=list)  # one reads its prefix instead) / RETRACING: layers to re-score
    unmoved: list[int] = field(default_factory=list)  # layers whose first kept set is not in the execution yet (dense)
    retrace_position: int = 0
    triggered_at: int = 0
    retrace_seconds: float = 0.0
    retrace_changed: dict[int, int] = field(default_factory=dict)
    position: int = 0
    prompt_tokens: int = 0
    retraces: list[RetraceRecord] = field(default_factory=list)
    neurons_total: float = 0.0
    neurons_executed: float = 0.0
    neurons_scored: float = 0.0    # re-trace scoring from the ring, in neuron executions (costs.retrace_neurons)
    flops: dict[str, float] = field(default_factory=lambda: {"tracing": 0.0, "monitoring": 0.0, "retrace": 0.0})
    dense_flops: float = 0.0


def _unit(scores: torch.Tensor) -> torch.Tensor:
    """Each row (the last dimension) scaled to unit length."""
    return scores / scores.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Engine:
    """DART over one model. Build it once per model and configuration; it keeps one sequence at a time.

    widened: the loop that drives it computes in float32 on a CPU whatever the weights' dtype (dartprune's native
    loop does), so the weights take the layout that suits float32 in bfloat16 and float16 too (`neuron_major_pays`).
    """

    def __init__(self, model: nn.Module, config: DartConfig, widened: bool = False):
        if getattr(model, "dartprune_handle", None) is not None:       # its FFNs are taps now; its engine owns them
            raise RuntimeError("dartprune is already attached to this model; detach that handle first")
        self.model = model
        self.config = config
        self.adapter = get_adapter(model)
        self.layers = self.adapter.layers()
        self._downs = [self.adapter.down_proj(layer) for layer in self.layers]      # keys of the prior cache
        parts = [self.adapter.ffn_parts(layer) for layer in self.layers]
        self.sizes = [p.intermediate_size for p in parts]
        self.method = get_method(config.method)(config, parts, model)
        # At sparsity 0 nothing prunes: the drivers run the untouched model and only account tokens.
        self.prunes = self.method.prunes and config.sparsity > 0
        if self.prunes:
            if model in _PRUNING:
                raise RuntimeError("another dartprune Engine prunes this model (its weights are permuted in place); "
                                   "close it first")
        self.follows_drift = self.prunes and self.method.follows_drift
        self.per_token = self.prunes and self.method.execution == "per-token"
        # resolved (and refused when out of range) before any weight is laid out anew
        self.monitored = (monitored_layer_indices(config.monitored_layers, len(self.layers)) if self.follows_drift
                          else [])
        # FFN weights laid out neuron-major while this engine prunes (see weights.py); the FFN parts are read after
        # that, so they are views of the layout in use
        self._offloaded = {i for i, p in enumerate(parts) if offloaded(p)}
        self._relaid = [weight for i, layer in enumerate(self.layers) if self.prunes and i not in self._offloaded
                        for weight, rows in transposed_parameters(layer, parts[i]) if to_neuron_major(weight, rows, widened)]
        self.parts = [self.adapter.ffn_parts(layer) for layer in self.layers] if self._relaid else parts
        if self.prunes and config.path == "compact" and not self.per_token:     # the path that swaps in place
            swap_library()                    # built (or found in the cache) now, not in the first prompt
            for i, p in enumerate(self.parts):
                if i not in self._offloaded:
                    for tensor in (p.gate, p.up, p.up_bias, p.down):
                        if tensor is not None:
                            own_pages(tensor)
        self.hidden = self.parts[0].up.shape[1]
        self.gated = self.parts[0].gated
        self.prefix: list[PrefixFFN | ModuleFFN] = [
            ModuleFFN(self.adapter.ffn(layer), self.adapter.down_proj(layer), p.intermediate_size)
            if i in self._offloaded else PrefixFFN(p)
            for i, (layer, p) in enumerate(zip(self.layers, self.parts))] if self.prunes else []
        layer_params = sum(p.numel() for p in nn.ModuleList(self.layers).parameters())
        self._dense_per_token = costs.dense_flops_per_token(layer_params, self.adapter.output_embeddings().numel())
        self.rows: list[_Row] = []
        self.ring: Ring | None = None
        self._compact = False
        self._masks: list[torch.Tensor | None] = []
        self._step: Step | None = None
        self._valid = torch.ones(0, 0, dtype=torch.bool)
        self._tracing = torch.ones(0, 0, dtype=torch.bool)   # this forward's valid tokens of the rows that trace
        self._traced: list[int] = []                          # per row, how many of them
        self._signal: list[torch.Tensor | None] = []
        self._active: dict[int, torch.Tensor] = {}
        self._terms: dict[int, torch.Tensor] = {}          # layer -> its importance_terms in this forward
        self._turn = False
        self._replay = self._trace_only = False
        self._ended = False
        self.closed = False
        self._last_stats: list[SequenceStats] = []           # what `stats` gives once the engine is closed
        if self.prunes:
            _PRUNING[model] = self

    # ----------------------------------------------------------------- the step API
    def start(self, batch: int) -> None:
        """A new sequence of `batch` rows; its next forward is the prompt, traced dense.

        The weights go back to their original order first, so that a sequence computes the same whatever ran
        before it (the order of a sum decides its last bits, and a greedy choice or a drift decision can hang on
        them)."""
        self._check_open()
        for prefix in self.prefix:
            prefix.restore()                  # nothing to move after `end_sequence`
        self._ended = False
        self.rows = [self._new_row() for _ in range(batch)]
        self._compact = batch == 1 and self.config.path == "compact" and not self.per_token
        self._masks = [None] * len(self.layers)
        self.ring = None
        if self.follows_drift:
            dtype = self.parts[0].up.dtype
            devices = [p.up.device for p in self.parts if p.up.device.type != "meta"]
            device = devices[0] if devices else torch.device("cpu")
            self.ring = Ring(len(self.layers), len(self.monitored), batch, self.config.ring_size, self.hidden, dtype,
                             device)

    def new_turn(self) -> None:
        """The next forward brings a new turn of a conversation: its tokens are traced dense like a prompt, and the
        masks are rebuilt from them (blended with the earlier scores) and the drift baseline refitted."""
        self._turn = True

    def begin_forward(self, valid: torch.Tensor, trace_only: bool = False, replay: bool = False) -> Step:
        """Prepare a forward of `valid.shape[1]` tokens ([batch, tokens] bool, False = padding).

        trace_only: a dense pass that only traces (`prune_prefill`'s first pass); replay: the pruned pass over the
        same prompt tokens that follows it (not written to the ring, not monitored)."""
        self._check_open()
        if self._ended:
            self._resume()
        if not self.rows:
            raise RuntimeError("this forward continues a sequence, but none is open (reset, or never started): "
                               "start again from the prompt with an empty cache")
        if len(self.rows) != valid.shape[0]:
            raise RuntimeError(f"batch size changed from {len(self.rows)} to {valid.shape[0]} inside one sequence; "
                               "dartprune keeps per-row state and does not follow beam reordering")
        self._valid = valid.bool().cpu()
        self._replay, self._trace_only = replay, trace_only
        if replay:                                    # the pruned pass over the prompt runs on every mask
            for b in range(len(self.rows)):
                self._move(b, len(self.layers))
        if self._turn:
            self._turn = False
            for row in self.rows:
                self._enter_tracing(row, Event.TURN, target=1)
        batch, tokens = valid.shape
        tracing_rows = [row.phase is Phase.TRACING for row in self.rows]
        self._tracing = self._valid & torch.tensor(tracing_rows, dtype=torch.bool)[:, None]
        self._traced = self._tracing.sum(dim=1).tolist()
        dense = not self.prunes or trace_only or any(tracing_rows)
        on_masks = tuple(b for b, row in enumerate(self.rows) if row.built and row.phase is not Phase.TRACING) \
            if self.prunes and dense and not trace_only else ()
        importance = self.prunes and any(row.phase is Phase.TRACING and not row.built for row in self.rows)
        self._signal = [None] * len(self.monitored)
        self._active = {}
        self._terms = {}
        if self.ring is not None and not replay:
            self.ring.begin(tokens, self._valid)
        self._step = Step(dense=dense, importance=importance, monitor=tuple(self.monitored) if not replay else (),
                          batch=batch, tokens=tokens, on_masks=on_masks)
        return self._step

    def trace(self, layer: int, x: torch.Tensor, u: torch.Tensor | None = None, h: torch.Tensor | None = None,
              f: torch.Tensor | None = None) -> None:
        """Report a dense FFN of this forward: its input x and activations u ([batch, tokens, .]), and, when
        `step.importance`, the residual h entering the FFN block and the block's output f."""
        step = self._step
        if self.ring is not None and not self._replay:
            self.ring.write_x(layer, x.reshape(step.batch, step.tokens, -1))
        if not self.prunes:
            return
        tracing, traced = self._tracing, self._traced
        kind = self.method.trace_kind()
        if u is not None and kind is not None and any(traced):
            sumsq = squared_activations(u.detach().reshape(step.batch, step.tokens, -1), tracing.to(u.device), kind,
                                        self.config.ema_decay).cpu()
            for b, row in enumerate(self.rows):
                if traced[b]:
                    previous = row.trace.sumsq.get(layer)
                    if previous is not None and kind == "ema":
                        previous.mul_(self.config.ema_decay ** traced[b])
                    row.trace.sumsq[layer] = sumsq[b] if previous is None else previous + sumsq[b]
        if step.importance and h is not None and f is not None:
            shape = (step.batch, step.tokens, -1)
            self._terms[layer] = importance_terms(h.detach().reshape(shape), f.detach().reshape(shape))

    def ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The pruned FFN of this forward on input x (any shape [..., hidden])."""
        step = self._step
        if self.ring is not None and not self._replay:
            self.ring.write_x(layer, x.reshape(step.batch, step.tokens, -1))
        if self._compact:
            return self.prefix[layer].forward(x)
        y = self._pruned(layer, x.reshape(step.batch, step.tokens, -1), list(range(step.batch)))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def rows_on_masks(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """After a dense FFN in a forward where some rows trace: the output `y` with the rows of `step.on_masks`
        computed on their masks instead, so that each row's output is its own whatever the other rows do."""
        step = self._step
        if not step.on_masks or (self._masks[layer] is None and not self.per_token):    # no kept set in yet
            return y
        rows = list(step.on_masks)
        x3, y3 = x.reshape(step.batch, step.tokens, -1), y.reshape(step.batch, step.tokens, -1).clone()
        y3[rows] = self._pruned(layer, x3[rows], rows).to(y3.dtype)
        return y3.reshape(y.shape)

    def _pruned(self, layer: int, x3: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The pruned FFN (mask path, per-token or offloaded) of batch rows `rows` on their inputs x3 [rows,
        tokens, hidden]."""
        masks = self._masks[layer]
        if masks is not None and len(rows) != masks.shape[0]:
            masks = masks[torch.tensor(rows, device=masks.device)]
        if layer in self._offloaded:
            return self.prefix[layer].forward(x3, masks)
        parts = self.parts[layer]
        if not self.per_token:                          # no mask yet (no kept set moved in): dense
            return masked_ffn(parts, x3, masks)
        u = activations(parts, x3)
        active = self.method.active(layer, u)
        counts = torch.full((self._step.batch, self._step.tokens), self.sizes[layer])   # rows not here: dense
        counts[rows] = active.sum(dim=-1).cpu()
        self._active[layer] = counts
        return nn.functional.linear(u * active, parts.down, parts.down_bias)

    def record_inputs(self, xs: torch.Tensor) -> None:
        """The FFN inputs of every layer at once ([layers, batch, tokens, hidden]), for a loop that runs the FFNs
        itself from `keep_counts` (the prefix of each layer's permuted weights)."""
        if self.ring is not None and not self._replay:
            self.ring.write_all_x(xs)

    def observe_attention(self, j: int, a: torch.Tensor) -> None:
        """The output of monitored layer `self.monitored[j]`'s attention block in this forward ([batch, tokens,
        hidden], after its output projection, before the residual add)."""
        step = self._step
        a = a.detach().reshape(step.batch, step.tokens, -1).float()
        self._signal[j] = a
        if self.ring is not None and not self._replay:
            self.ring.write_a(j, a)

    def end_forward(self) -> None:
        """After the forward: accounting, masks for rows that finished tracing, drift, re-traces."""
        step = self._step
        if self._trace_only:        # its tokens come again in the replay; the work it did counts (executed sparsity)
            for b, row in enumerate(self.rows):
                row.neurons_executed += int(self._valid[b].sum()) * sum(self.sizes)
        else:
            for b, row in enumerate(self.rows):
                if row.position == 0:
                    row.prompt_tokens = int(self._valid[b].sum())
            self._account(step.dense)
        if self.ring is not None and not self._replay:
            self.ring.end()                   # this forward's tokens are the newest in the buffer from here on
        if self._terms:                     # every layer's importance at once (a few small ops instead of 30 x them)
            self._add_importance()
        have_signal = bool(self.monitored) and all(s is not None for s in self._signal)
        signal = torch.stack(self._signal) if have_signal else None      # [monitored, batch, tokens, hidden]
        for b, row in enumerate(self.rows):
            tokens = int(self._valid[b].sum())
            moving = bool(row.unmoved)      # first masks still moving in: a share per token of the later forwards
            if row.phase is Phase.TRACING:
                row.trace.tokens += tokens
                if signal is not None:
                    row.trace.signal.append(signal[:, b][:, self._valid[b]])
                if row.trace.tokens >= row.target:
                    self._build(b)
            elif row.phase is Phase.PRUNED and signal is not None and not self._replay:
                row.flops["monitoring"] += costs.monitoring_flops(tokens, len(self.monitored), self.hidden,
                                                                  self.config.window)
                if row.drift.observe(signal[:, b][:, self._valid[b]], row.position):
                    if self.config.retrace == "dense-steps":
                        self._enter_tracing(row, Event.DRIFT_DENSE, target=self.config.dense_steps)
                        row.triggered_at = row.position
                    else:
                        self._begin_retrace(b)
            if moving and row.phase is Phase.PRUNED:
                self._move(b, math.ceil(len(self.layers) * max(1, tokens) / self.config.build_spread))
            if row.phase is Phase.RETRACING:     # a share of the layers for each token this forward brought
                self._rescore(b, math.ceil(len(self.layers) * max(1, tokens) / self.config.retrace_spread))
        self._step = None

    def _add_importance(self) -> None:
        """The layer importance of this forward's traced tokens, from the terms each layer reported, into each
        tracing row's sums (weighted by its traced tokens)."""
        layers = sorted(self._terms)
        device = self._terms[layers[0]].device
        terms = torch.stack([self._terms[i].to(device) for i in layers])       # [layers, 3, batch, tokens]
        means = importance_from_terms(terms, self._tracing.to(device), self.config.importance).tolist()
        for i, per_row in zip(layers, means):
            for b, row in enumerate(self.rows):
                if self._traced[b]:
                    row.trace.importance[i] = row.trace.importance.get(i, 0.0) + per_row[b] * self._traced[b]

    def retrace(self, row: int = 0, now: bool = True) -> RetraceRecord | None:
        """Re-trace row `row` from its ring buffer as the monitor would: every layer at once (`now`, returning the
        record), or spread over the next forwards as `retrace_spread` says."""
        if self._ended:
            self._resume()
        if self.ring is None or not self.rows[row].built:
            raise RuntimeError("nothing to re-trace: the method does not follow drift, or the sequence has no masks")
        state = self.rows[row]
        if state.phase is Phase.TRACING:
            raise RuntimeError(f"row {row} is tracing dense (a new turn, or retrace='dense-steps'); its masks are "
                               "rebuilt when that ends, so there is nothing to re-trace now")
        if state.phase is Phase.RETRACING:          # finish a spread re-trace first
            self._rescore(row, len(self.layers))
        self._begin_retrace(row)
        if not now:
            return None
        self._rescore(row, len(self.layers))
        return state.retraces[-1]

    def _begin_retrace(self, b: int) -> None:
        state = self.rows[b]
        self._move(b, len(self.layers))
        state.phase = next_phase(state.phase, Event.DRIFT)
        state.pending = list(range(len(self.layers)))
        state.retrace_position, state.retrace_seconds, state.retrace_changed = state.position, 0.0, {}

    @property
    def traces_prompt(self) -> bool:
        """Whether a prompt must be traced (dense) before the masks it prunes with exist."""
        return self.prunes and (self.method.reads_trace or self.follows_drift)

    def prunes_prompt(self, valid: torch.Tensor) -> bool:
        """Whether this prompt ([batch, tokens] valid) runs on masks (`prune_prefill`): it does when its masks can
        be built first, from the method alone or from a trace of every row's `min_trace_tokens` tokens; a shorter
        prompt runs dense and traced, as without prune_prefill."""
        if not (self.prunes and self.config.prune_prefill):
            return False
        return not self.traces_prompt or int(valid.sum(dim=1).min()) >= max(1, self.config.min_trace_tokens)

    def build_untraced(self) -> None:
        """A new sequence's rows take their masks now, from what the method holds (calibration, a seed) rather than a
        trace; for a method that reads none (`traces_prompt` False), before a pruned prompt."""
        for b in range(len(self.rows)):
            self._build(b)

    def next_forward_dense(self) -> bool:
        """Whether the next forward must run dense and be traced (a row still traces, or a new turn comes)."""
        return self.prunes and (self._turn or any(row.phase is Phase.TRACING for row in self.rows))

    @property
    def prefix_capable(self) -> bool:
        """A batch of one runs each pruned layer over the prefix of its permuted weights: the compact path, a
        kept-set method, every weight in memory (a loop that runs the FFNs itself needs it)."""
        return self.prunes and self.config.path == "compact" and not self.per_token and not self._offloaded

    @property
    def runs_prefix(self) -> bool:
        """Pruned forwards of this sequence run each layer over the prefix of its permuted weights (a batch of one
        on the compact path, every weight in memory), so a loop may run them itself from `keep_counts`."""
        return self._compact and not self._offloaded

    @property
    def keeps_ring(self) -> bool:
        """The method re-traces from a ring buffer of FFN inputs (a loop that runs the FFNs itself passes them to
        `record_inputs`)."""
        return self.ring is not None

    def keep_counts(self) -> list[int]:
        """Neurons each layer runs in a pruned forward of a batch of one (the prefix of its permuted weights)."""
        return [p.k for p in self.prefix] if self.prunes else list(self.sizes)

    def kept(self, row: int, layer: int) -> torch.Tensor:
        """Row `row`'s kept neuron ids in `layer`, ascending."""
        state = self.rows[row]
        if not state.built or not self.prunes or layer in state.unmoved:
            return torch.arange(self.sizes[layer])
        if self._compact:
            return self.prefix[layer].kept() if not self._ended else self._kept_sets(state, [layer])[layer]
        return state.kept[layer]

    def scores(self, row: int, layer: int) -> torch.Tensor:
        """Row `row`'s current neuron scores in `layer`, by neuron id (empty before its masks are built)."""
        state = self.rows[row]
        return state.scores[layer] if state.scores else torch.zeros(0)

    def phase(self, row: int = 0) -> Phase:
        return self.rows[row].phase

    def stats(self) -> list[SequenceStats]:
        """One `SequenceStats` per row of the current (or last) sequence, still readable after `close`."""
        return list(self._last_stats) if self.closed else [self._row_stats(row) for row in self.rows]

    def end_sequence(self) -> None:
        """The sequence is not expected to go on: every weight goes back to its original order now, so that the
        next sequence's `start` has nothing to move before its prompt. Its statistics stay readable, and a forward
        that continues it after all first puts its kept neurons back in front."""
        for prefix in self.prefix:
            prefix.restore()
        self._ended = True

    def _resume(self) -> None:
        """An ended sequence goes on: its kept sets, from its scores, back into the weights."""
        self._ended = False
        if self._compact and self.rows and self.rows[0].built:
            self.rows[0].unmoved = []
            self._apply_layers(0, list(range(len(self.layers))))

    def reset(self) -> None:
        """Forget the sequence (its statistics too); the next `start` begins a new one."""
        self.rows = []
        self.ring = None

    def close(self) -> None:
        """Put every weight back in its original order and layout (bit for bit) and forget the sequence, keeping
        its statistics readable. Closing twice does nothing."""
        if self.closed:
            return
        self._last_stats = self.stats()
        for prefix in self.prefix:
            prefix.release() if isinstance(prefix, ModuleFFN) else prefix.restore()
        for weight in self._relaid:
            to_row_major(weight)
        self._relaid, self.prefix = [], []
        self.rows = []
        self.ring = None
        self.closed = True
        if _PRUNING.get(self.model) is self:
            del _PRUNING[self.model]

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this engine is closed (its model was restored); build a new one to prune again")

    # ----------------------------------------------------------------- rows and phases
    def _new_row(self) -> _Row:
        c = self.config
        return _Row(phase=Phase.TRACING, target=max(1, c.min_trace_tokens), drift=make_detector(c))

    def _enter_tracing(self, row: _Row, event: Event, target: int) -> None:
        row.phase = next_phase(row.phase, event)
        row.reason = event
        row.target = target
        row.trace = _Trace()
        row.pending = []

    # ----------------------------------------------------------------- masks
    @torch.no_grad()
    def _build(self, b: int) -> None:
        """The row finished tracing: its masks are built (or, for a method that keeps the first turn's masks at a
        new turn, kept) and it leaves the tracing phase."""
        row = self.rows[b]
        keeps_masks = row.built and row.reason is Event.TURN and not self.method.follows_turns
        if not self.prunes:
            row.keep = list(self.sizes)
        elif not keeps_masks:                         # a kept mask is not a re-trace: nothing to score or record
            self._rebuild(b)
        row.built = True
        row.phase = next_phase(row.phase, Event.TRACED)
        row.trace = _Trace()

    def _rebuild(self, b: int) -> None:
        """Budgets (first time), scores, kept sets, execution, drift baseline; a re-trace is recorded."""
        start = time.perf_counter()
        row = self.rows[b]
        trace = row.trace
        first = not row.built
        fresh = [self._trace_scores(i, trace.sumsq.get(i)) for i in range(len(self.layers))]
        if first:
            importance = torch.tensor([[trace.importance.get(i, 0.0) / max(1, trace.tokens)
                                        for i in range(len(self.layers))]])
            importance = self.method.layer_importance(importance)[0]
            allocation = self.config.replace(allocation=self.method.allocation_for())
            row.keep = keep_counts(pruning_ratios(importance, self.config.sparsity, allocation), self.sizes)
            row.scores = fresh
            row.kept = [None] * len(self.layers)
            row.flops["tracing"] += costs.tracing_flops(trace.tokens, self.sizes, self.hidden)
        else:
            weight = self.config.turn_blend if row.reason is Event.TURN else self.config.retrace_blend
            self._blend_into(row, dict(enumerate(fresh)), weight)
        if first and self.config.build_spread > 1 and not self.per_token:
            row.unmoved = list(range(len(self.layers)))       # moved by the forwards that follow (`_move`)
            changed = []
        else:
            row.unmoved = []
            entered = self._apply_layers(b, list(range(len(self.layers))))
            changed = [entered[i] for i in range(len(self.layers))]
        if self.monitored:
            baseline = torch.cat(trace.signal, dim=1) if trace.signal else None
            if baseline is not None:
                row.drift.fit(baseline) if first else row.drift.refit(baseline)
        if not first:
            row.retraces.append(RetraceRecord(row.position, time.perf_counter() - start, changed, row.triggered_at
                                              if row.triggered_at else row.position))
            row.triggered_at = 0

    def _trace_scores(self, layer: int, sumsq: torch.Tensor | None) -> torch.Tensor:
        """Per-neuron-id scores from a traced sum of squares (in the layer's current neuron order)."""
        if sumsq is not None and self.prefix:
            sumsq = self.prefix[layer].to_ids(sumsq)
        scores = self.method.neuron_scores(layer, sumsq, self.sizes[layer])
        if self.config.prior is not None:
            scores = scores * self._prior(layer)
        return scores

    @staticmethod
    def _blend_into(row: _Row, fresh: dict[int, torch.Tensor], blend: float) -> None:
        """A re-trace's scores for the layers in `fresh`: the fresh ones, with a share `blend` of the old blended
        in (each layer's both unit length first: the old summed over the prompt, the fresh over a few tokens)."""
        if not blend:
            for i, new in fresh.items():
                row.scores[i] = new
            return
        for layers, new in same_length_groups(fresh):
            old = torch.stack([row.scores[i] for i in layers])
            for i, scores in zip(layers, (1 - blend) * _unit(new) + blend * _unit(old)):
                row.scores[i] = scores

    @staticmethod
    def _kept_sets(row: _Row, layers: list[int]) -> dict[int, torch.Tensor]:
        """The neuron ids a row's scores and budgets keep in each of `layers` (ascending)."""
        kept: dict[int, torch.Tensor] = {}
        for group, scores in same_length_groups({i: row.scores[i] for i in layers}):
            kept.update(zip(group, top_neurons_rows(scores, [row.keep[i] for i in group])))
        return kept

    def _apply_layers(self, b: int, layers: list[int]) -> dict[int, int]:
        """Row b's kept sets of `layers` from its scores, into the execution; returns the neurons that entered
        each."""
        return {i: self._apply(b, i, kept) for i, kept in self._kept_sets(self.rows[b], layers).items()}

    def _apply(self, b: int, layer: int, kept: torch.Tensor) -> int:
        """Row b's kept set of `layer` (ids, ascending), into the execution; returns the neurons that entered."""
        row = self.rows[b]
        if self._compact:
            return self.prefix[layer].keep(kept)
        previous, row.kept[layer] = row.kept[layer], kept
        if not self.per_token:
            if self._masks[layer] is None:
                up = self.parts[layer].up                     # an offloaded layer's weights sit on meta until it runs
                device = torch.device("cpu") if up.device.type == "meta" else up.device
                self._masks[layer] = torch.ones(len(self.rows), 1, self.sizes[layer], dtype=up.dtype, device=device)
            self._masks[layer][b, 0] = self.prefix[layer].mask(kept, self._masks[layer].dtype).to(
                self._masks[layer].device)
        if previous is None:
            return int(kept.numel())
        was = torch.zeros(self.sizes[layer], dtype=torch.bool)
        was[previous] = True
        return int((~was[kept]).sum())

    def _move(self, b: int, count: int) -> None:
        """Up to `count` of row b's unmoved layers take their first kept set (until then they run dense)."""
        row = self.rows[b]
        layers, row.unmoved = row.unmoved[:count], row.unmoved[count:]
        self._apply_layers(b, layers)

    def _prior(self, layer: int) -> torch.Tensor:
        """The prior of `layer`, by neuron id: computed at its first use, once per down projection and kind, and
        kept while the model lives (for any engine on it)."""
        cached = _PRIOR_CACHE.setdefault(self._downs[layer], {})
        if self.config.prior not in cached:
            if layer in self._offloaded:
                raise ConfigError(f"prior={self.config.prior!r} needs the FFN weights in memory; this layer is "
                                  "offloaded")
            down = self.prefix[layer].to_ids(self.parts[layer].down) if self.prefix else self.parts[layer].down
            cached[self.config.prior] = neuron_prior(self.adapter.to_embedding_space(down.float()),
                                                     self.adapter.output_embeddings(), self.config.prior)
        return cached[self.config.prior]

    # ----------------------------------------------------------------- re-trace from the ring
    @torch.no_grad()
    def _rescore(self, b: int, count: int) -> None:
        """Re-score up to `count` of row b's pending layers from the ring buffer; when none is left, the row's
        drift baseline is refitted from the buffer and the re-trace recorded."""
        row = self.rows[b]
        start = time.perf_counter()
        order = self.ring.order(b)
        tokens = order.numel()
        kind = self.method.trace_kind()
        valid = torch.ones(1, tokens, dtype=torch.bool)
        layers, row.pending = row.pending[:count], row.pending[count:]
        fresh = {}
        for i in layers:
            x = self.ring.x[i, b].index_select(0, order.to(self.ring.x.device))
            x = x.to(self.parts[i].up.device) if i not in self._offloaded else x
            sumsq = squared_activations(self.prefix[i].activations(x)[None].cpu(), valid, kind,
                                        self.config.ema_decay)[0]
            fresh[i] = self._trace_scores(i, sumsq)
        self._blend_into(row, fresh, self.config.retrace_blend)
        row.retrace_changed.update(self._apply_layers(b, layers))
        sizes = [self.sizes[i] for i in layers]
        row.flops["retrace"] += costs.retrace_flops(tokens, sizes, self.hidden, self.gated)
        row.neurons_scored += costs.retrace_neurons(tokens, sizes, self.gated)
        row.retrace_seconds += time.perf_counter() - start
        if not row.pending:
            if self.monitored:
                row.drift.refit(self.ring.a[:, b].index_select(1, order.to(self.ring.a.device)))
            changed = [row.retrace_changed.get(i, 0) for i in range(len(self.layers))]
            row.retraces.append(RetraceRecord(row.retrace_position, row.retrace_seconds, changed))
            row.phase = next_phase(row.phase, Event.RESCORED)

    # ----------------------------------------------------------------- accounting
    def _account(self, dense: bool) -> None:
        active = None
        if self._active:                # per-token execution: count the neurons that really ran
            per_token = torch.stack(list(self._active.values())).sum(dim=0)
            per_token = per_token + sum(s for i, s in enumerate(self.sizes) if i not in self._active)
            active = (per_token * self._valid).sum(dim=1).tolist()
        total = sum(self.sizes)
        for b, row in enumerate(self.rows):
            tokens = int(self._valid[b].sum())
            row.position += tokens
            row.dense_flops += tokens * self._dense_per_token
            row.neurons_total += tokens * total
            if active is not None:
                row.neurons_executed += active[b]
            elif (dense and b not in self._step.on_masks) or not row.built:
                row.neurons_executed += tokens * total
            else:
                row.neurons_executed += tokens * sum(self.sizes[i] if i in row.unmoved else k
                                                     for i, k in enumerate(row.keep))

    def _row_stats(self, row: _Row) -> SequenceStats:
        keep = row.keep or list(self.sizes)
        state = costs.state_bytes(self.sizes, self.hidden, self.config.ring_size, len(self.monitored),
                                  self.config.window, self.parts[0].up.element_size(), self.ring is not None)
        return SequenceStats(
            method=self.config.method, sparsity=self.config.pruned_sparsity, tokens=row.position,
            prompt_tokens=row.prompt_tokens, keep_counts=list(keep), intermediate_sizes=list(self.sizes),
            retraces=list(row.retraces), windows=list(row.drift.records),
            executed_sparsity=1 - row.neurons_executed / row.neurons_total if row.neurons_total else 0.0,
            work_sparsity=1 - (row.neurons_executed + row.neurons_scored) / row.neurons_total
            if row.neurons_total else 0.0,
            state_bytes=state["total"] if self.prunes else 0, overhead_flops=dict(row.flops),
            dense_flops=row.dense_flops, retrace_seconds=sum(r.seconds for r in row.retraces))
