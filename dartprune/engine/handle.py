"""`attach(model, config)`: turn a loaded causal LM into a DART model in place, and the handle that runs it.

The handle watches every forward of the model. A forward over an empty cache starts a new sequence: it runs
dense (unless `prune_prefill`) while hooks trace neuron scores, layer importance and the drift baseline, and
when it ends the handle builds per-row budgets and masks. Every later forward runs pruned; after it, the drift
monitor reads the attention outputs and may re-trace a row from its ring buffer. `model.generate` needs no
change: the KV cache, sampling, streamers and stopping criteria all sit above the forward.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dartprune.architectures import get_adapter
from dartprune.engine.budgets import keep_counts, layer_importance, pruning_ratios
from dartprune.engine.config import ConfigError, DartConfig
from dartprune.engine.drift import DriftMonitor
from dartprune.engine.ffn import CompactWeights, PrunedFFN, activations, entering
from dartprune.engine.methods import make_method
from dartprune.engine.scoring import squared_activations, top_neurons, vocab_prior
from dartprune.engine.stats import RetraceRecord, SequenceStats

_PRIOR_CACHE: weakref.WeakKeyDictionary[torch.Tensor, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


@dataclass
class _Row:
    """State of one sequence in the batch."""

    keep: list[int]
    kept: list[torch.Tensor]
    scores: list[torch.Tensor]
    drift: DriftMonitor
    prompt_tokens: int
    position: int
    retraces: list[RetraceRecord] = field(default_factory=list)
    dense_left: int = 0
    neurons_total: float = 0.0
    neurons_executed: float = 0.0
    flops: dict[str, float] = field(default_factory=lambda: {"tracing": 0.0, "monitoring": 0.0, "retrace": 0.0})
    dense_flops: float = 0.0


def _unit(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.norm().clamp_min(1e-12)


class DartHandle:
    """Owns the hooks, the replaced FFNs and the per-sequence state of one attached model."""

    def __init__(self, model: nn.Module, config: DartConfig):
        self.model = model
        self.config = config
        self.adapter = get_adapter(model)
        self.method = make_method(config)
        # At sparsity 0 nothing is replaced and only the two model-level hooks (for stats) are installed, so the
        # forward runs the untouched model's code and costs nothing extra.
        self.prunes = self.method.prunes and config.sparsity > 0
        # Only a method that re-traces reads the ring buffer; the others skip filling it on every token.
        self.keeps_ring = self.prunes and self.method.follows_drift
        # slot indices of the ring buffer from any start, precomputed: a forward's slots are then one slice
        self._ring_ids = torch.arange(2 * config.ring_size) % config.ring_size
        self.layers = self.adapter.layers()
        self.parts = [self.adapter.ffn_parts(layer) for layer in self.layers]
        self.sizes = [p.intermediate_size for p in self.parts]
        self.hidden = self.parts[0].up.shape[1]
        self.monitored = self._monitored_layers()
        self.thresholds = self.method.setup(self)
        self._originals = [self.adapter.ffn(layer) for layer in self.layers]
        self._downs = [self.adapter.down_proj(layer) for layer in self.layers]
        self._norms = [self.adapter.ffn_input_norm(layer) for layer in self.layers]
        self._out_norms = [self.adapter.ffn_output_norm(layer) for layer in self.layers]
        self._dense_flops_per_token = 2.0 * (sum(p.numel() for p in nn.ModuleList(self.layers).parameters())
                                             + self.adapter.output_embeddings().numel())
        self.ffns: list[PrunedFFN] = []
        if self.prunes:
            for i, layer in enumerate(self.layers):
                ffn = PrunedFFN(i, self._originals[i], self.parts[i], self)
                self.adapter.set_ffn(layer, ffn)
                self.ffns.append(ffn)
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        if self.prunes and self.method.follows_drift:
            self._hooks += [self.adapter.attention(self.layers[layer]).register_forward_hook(self._attention_hook(j))
                            for j, layer in enumerate(self.monitored)]
        self._trace_hooks: list[Any] = []
        self.rows: list[_Row] = []
        self.batch = self.tokens = 0
        self.tracing = False
        self._phase = "idle"
        model._dartprune_handle = self

    # ----------------------------------------------------------------- public API
    def detach(self) -> None:
        """Restore the exact original model: its own FFN modules, no hooks, no state."""
        for hook in self._hooks + self._trace_hooks:
            hook.remove()
        self._hooks, self._trace_hooks = [], []
        if self.ffns:
            for layer, original in zip(self.layers, self._originals):
                self.adapter.set_ffn(layer, original)
        self.ffns = []
        self.rows = []
        self.model._dartprune_handle = None

    def reset(self) -> None:
        """Forget the current sequence; the next forward starts a new one anyway."""
        self.rows = []
        self._phase = "idle"

    def stats(self) -> list[SequenceStats]:
        """One `SequenceStats` per row of the current (or last) sequence."""
        return [self._row_stats(row) for row in self.rows]

    def __enter__(self) -> DartHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ----------------------------------------------------------------- forward hooks
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        reference = ids if ids is not None else kwargs.get("inputs_embeds")
        if reference is None:
            raise ValueError("dartprune needs input_ids or inputs_embeds in the forward call")
        batch, tokens = reference.shape[0], reference.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        new_sequence = cache is None or cache.get_seq_length() == 0
        mask = kwargs.get("attention_mask")
        valid = mask[:, -tokens:].bool() if mask is not None and mask.dim() == 2 else torch.ones(
            batch, tokens, dtype=torch.bool)
        if not new_sequence and batch != len(self.rows):
            raise RuntimeError(f"batch size changed from {len(self.rows)} to {batch} inside one sequence; "
                               "dartprune keeps per-row state and does not follow beam reordering")
        self.batch, self.tokens, self._valid = batch, tokens, valid.cpu()
        self._ring_take = min(tokens, self.config.ring_size) if self.keeps_ring else 0
        start = 0 if new_sequence else self._ring_next
        self._ring_slots = self._ring_ids[start:start + self._ring_take]
        self._attn_now: list[torch.Tensor | None] = [None] * len(self.monitored)
        self._active: dict[int, torch.Tensor] = {}
        if new_sequence:
            self._start_sequence(batch)
            if self.config.prune_prefill and self.prunes:
                self._phase = "trace"
                self._set_tracing(True)
                with torch.no_grad():
                    self.model.base_model(input_ids=ids, inputs_embeds=kwargs.get("inputs_embeds"),
                                          attention_mask=mask, position_ids=kwargs.get("position_ids"),
                                          use_cache=False)
                self._set_tracing(False)
                self._finish_trace()
                self._phase = "pruned-prefill"
            else:
                self._phase = "trace"
                self._set_tracing(self.prunes)
        else:
            self._phase = "decode"
            dense_rows = [r.dense_left > 0 for r in self.rows]
            if any(dense_rows):
                self._dense_rows = torch.tensor(dense_rows)
                self._set_tracing(True)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ran_dense = self._phase == "trace" or self._dense_now
        if self._phase == "trace":
            self._set_tracing(False)
            self._finish_trace()
        elif self._phase == "decode":
            if self.tracing:
                self._set_tracing(False)
                self._finish_dense_steps()
            self._monitor()
        self._account_forward(ran_dense)
        if self._ring_take:
            self._ring_next = (self._ring_next + self._ring_take) % self.config.ring_size
            self._ring_valid[:, self._ring_slots] = self._valid[:, -self._ring_take:]
            self._ring_written = min(self.config.ring_size, self._ring_written + self._ring_take)
        if self._phase == "pruned-prefill":
            self._phase = "decode"

    # ----------------------------------------------------------------- what PrunedFFN asks
    def path_for(self, layer: int) -> str:
        if self._phase == "trace" or self._dense_now or self._full[layer]:
            return "dense"
        if self.method.per_token:
            return "threshold"
        return "compact" if self._compact else "mask"

    def record_active(self, layer: int, active: torch.Tensor) -> None:
        """Threshold path: which neurons ran in this forward ([batch, tokens, I] bool), for executed sparsity."""
        self._active[layer] = active.sum(dim=-1)

    def remember_ffn_input(self, layer: int, x: torch.Tensor) -> None:
        if self._phase != "pruned-prefill" and self._ring_take:
            # one op per layer and decoded token when the input is a single token (no slice, no detach)
            last = x if x.shape[1] == self._ring_take else x[:, -self._ring_take:]
            self._ring_x[layer].index_copy_(1, self._ring_slots, last.detach() if last.requires_grad else last)

    def record_ffn_output(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """While tracing: layer importance from the residual h (captured by the norm hook) and the FFN output."""
        if self._phase != "trace":
            return
        h = self._pending_h.pop(layer) if self._norms[layer] is not None else x
        f = self._out_norms[layer](y) if self._out_norms[layer] is not None else y
        self._importance[layer] = layer_importance(h.reshape(f.shape).detach(), f.detach(), self._valid,
                                                   self.config.importance)

    # ----------------------------------------------------------------- tracing
    def _start_sequence(self, batch: int) -> None:
        dtype = self.parts[0].up.dtype
        ring = self.config.ring_size if self.keeps_ring else 0
        self._ring_x = torch.zeros(len(self.layers), batch, ring, self.hidden, dtype=dtype)
        self._ring_a = torch.zeros(len(self.monitored), batch, ring, self.hidden)
        self._ring_valid = torch.zeros(batch, ring, dtype=torch.bool)
        self._ring_next = self._ring_written = 0
        self._sumsq: dict[int, torch.Tensor] = {}
        self._importance: dict[int, torch.Tensor] = {}
        self._pending_h: dict[int, torch.Tensor] = {}
        self._dense_now = False
        self._full = [True] * len(self.layers)
        self._compact = batch == 1 and self.config.path == "compact"
        self.rows = []

    def _set_tracing(self, on: bool) -> None:
        for hook in self._trace_hooks:
            hook.remove()
        self._trace_hooks = []
        self.tracing = on
        self._dense_now = on and self._phase == "decode"
        if not on:
            return
        for i in range(len(self.layers)):
            if self.method.trace_kind is not None:
                self._trace_hooks.append(self._downs[i].register_forward_pre_hook(self._u_hook(i)))
            if self._phase == "trace" and self._norms[i] is not None:
                self._trace_hooks.append(self._norms[i].register_forward_pre_hook(self._h_hook(i)))

    def _u_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            u = args[0].reshape(self.batch, self.tokens, -1)
            valid = self._valid if self._phase == "trace" else self._valid & self._dense_rows[:, None]
            kind = self.method.trace_kind if self.method.trace_kind != "config" else self.config.score
            sumsq = squared_activations(u.detach(), valid, kind, self.config.ema_decay)
            self._sumsq[layer] = self._sumsq[layer] + sumsq if layer in self._sumsq else sumsq
        return hook

    def _h_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._pending_h[layer] = args[0].detach()
        return hook

    def _attention_hook(self, j: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._phase == "idle":
                return
            a = (output[0] if isinstance(output, tuple) else output).detach().float()
            self._attn_now[j] = a
            if self._phase != "pruned-prefill" and self._ring_take:
                self._ring_a[j].index_copy_(1, self._ring_slots, a[:, -self._ring_take:])
        return hook

    @torch.no_grad()
    def _finish_trace(self) -> None:
        """End of the prompt: budgets, scores and masks for every row; drift baselines."""
        valid_counts = self._valid.sum(dim=1).tolist()
        importance = torch.stack([self._importance.get(i, torch.zeros(self.batch)) for i in range(len(self.layers))],
                                 dim=1)
        importance = self.method.layer_importance(importance)
        sparsity = self.config.sparsity if self.prunes else 0.0
        alloc_config = self.config.replace(allocation="uniform") if self.method.uniform_budgets else self.config
        for b in range(self.batch):
            ratios = pruning_ratios(importance[b], sparsity, alloc_config)
            keep = keep_counts(ratios, self.sizes)
            scores = [self._neuron_scores(i, self._sumsq[i][b] if i in self._sumsq else None)
                      for i in range(len(self.layers))]
            drift = DriftMonitor(self.config.window, self.config.delta, self.config.floor,
                                 self.config.trigger_count, self.config.cooldown)
            signal = torch.stack([a[b][self._valid[b]] for a in self._attn_now]) if all(
                a is not None for a in self._attn_now) else None
            if signal is not None:
                drift.fit(signal)
            row = _Row(keep=keep, kept=[top_neurons(s, k) for s, k in zip(scores, keep)], scores=scores,
                       drift=drift, prompt_tokens=valid_counts[b], position=0)
            row.flops["tracing"] += valid_counts[b] * sum(3.0 * s + 12.0 * self.hidden for s in self.sizes)
            self.rows.append(row)
        self._sumsq, self._importance, self._pending_h = {}, {}, {}
        self._full = [all(row.keep[i] == size for row in self.rows) for i, size in enumerate(self.sizes)]
        self._build_execution()

    def _neuron_scores(self, layer: int, sumsq: torch.Tensor | None) -> torch.Tensor:
        scores = self.method.neuron_scores(layer, sumsq, self.sizes[layer])
        if self.config.prior is not None:
            scores = scores * self._prior(layer)
        return scores

    def _prior(self, layer: int) -> torch.Tensor:
        """Computed once per model weight and kind, kept while the model lives."""
        cached = _PRIOR_CACHE.setdefault(self._downs[layer].weight, {})
        if self.config.prior not in cached:
            cached[self.config.prior] = vocab_prior(self.parts[layer].down, self.adapter.output_embeddings(),
                                                    self.config.prior)
        return cached[self.config.prior]

    def _build_execution(self) -> None:
        """Compact weights (batch of one) or per-row masks for every pruned layer."""
        for i, ffn in enumerate(self.ffns):
            ffn.compact = ffn.mask = None
            if self._full[i] or self.method.per_token:
                continue
            if self._compact:
                ffn.compact = CompactWeights(self.parts[i], self.rows[0].kept[i])
            else:
                ffn.mask = self._mask_rows(i)

    def _mask_rows(self, layer: int) -> torch.Tensor:
        mask = torch.zeros(self.batch, 1, self.sizes[layer], dtype=self.parts[layer].up.dtype)
        for b, row in enumerate(self.rows):
            mask[b, 0, row.kept[layer]] = 1
        return mask

    # ----------------------------------------------------------------- drift and re-trace
    def _monitor(self) -> None:
        if not self.method.follows_drift or any(a is None for a in self._attn_now):
            return
        signal = torch.stack(self._attn_now)
        for b, row in enumerate(self.rows):
            if row.dense_left > 0:
                continue
            tokens = int(self._valid[b].sum())
            row.flops["monitoring"] += tokens * len(self.monitored) * self.hidden * (1 + 3 / self.config.window)
            if row.drift.observe(signal[:, b][:, self._valid[b]], row.position + tokens):
                if self.config.retrace == "dense-steps":
                    row.dense_left = self.config.dense_steps
                else:
                    self._retrace(b, row.position + tokens)

    def _ring_order(self) -> torch.Tensor:
        ring = self.config.ring_size
        if self._ring_written < ring:
            return torch.arange(self._ring_written)
        return (self._ring_next + torch.arange(ring)) % ring

    @torch.no_grad()
    def _retrace(self, b: int, position: int) -> None:
        """Re-score row b from its ring buffer with the full weights, rebuild its masks, refit its baseline."""
        start = time.perf_counter()
        row = self.rows[b]
        order = self._ring_order()
        order = order[self._ring_valid[b, order]]
        tokens = order.numel()
        ring = self._ring_x[:, b].index_select(1, order)
        valid = torch.ones(1, tokens, dtype=torch.bool)
        kind = self._trace_kind()
        changed = []
        for i, parts in enumerate(self.parts):
            sumsq = squared_activations(activations(parts, ring[i])[None], valid, kind, self.config.ema_decay)[0]
            changed.append(self._replace_scores(b, i, sumsq))
            row.flops["retrace"] += tokens * self.sizes[i] * (2.0 * self.hidden * (2 if parts.gated else 1) + 5.0)
        row.drift.refit(self._ring_a[:, b, order])
        row.retraces.append(RetraceRecord(position, time.perf_counter() - start, changed))

    def _trace_kind(self) -> str:
        return self.config.score if self.method.trace_kind in ("config", None) else self.method.trace_kind

    def _replace_scores(self, b: int, layer: int, sumsq: torch.Tensor) -> int:
        """New scores for one row and layer (blended with the old if asked); returns neurons that changed."""
        row = self.rows[b]
        fresh = self._neuron_scores(layer, sumsq)
        blend = self.config.retrace_blend
        if blend:
            # unit-normalise first: the old scores summed over the prompt, the fresh ones over R tokens
            fresh = (1 - blend) * _unit(fresh) + blend * _unit(row.scores[layer])
        row.scores[layer] = fresh
        kept = top_neurons(row.scores[layer], row.keep[layer])
        ffn = self.ffns[layer]
        if ffn.compact is not None:
            changed = ffn.compact.update(kept)
        else:
            changed = entering(row.kept[layer], kept, self.sizes[layer]).numel()
            if ffn.mask is not None:
                ffn.mask[b].zero_()
                ffn.mask[b, 0, kept] = 1
        row.kept[layer] = kept
        return changed

    @torch.no_grad()
    def _finish_dense_steps(self) -> None:
        """The authors' re-trace: after `dense_steps` dense tokens, rebuild from what they activated."""
        for b, row in enumerate(self.rows):
            if row.dense_left == 0:
                continue
            row.dense_left = max(0, row.dense_left - int(self._valid[b].sum()))  # tokens, not forward calls
            if row.dense_left == 0:
                start = time.perf_counter()
                changed = [self._replace_scores(b, i, self._sumsq[i][b]) for i in range(len(self.layers))]
                for sumsq in self._sumsq.values():
                    sumsq[b] = 0
                order = self._ring_order()
                row.drift.refit(self._ring_a[:, b, order[self._ring_valid[b, order]]])
                row.retraces.append(RetraceRecord(row.position + int(self._valid[b].sum()),
                                                  time.perf_counter() - start, changed))
        if all(row.dense_left == 0 for row in self.rows):
            self._sumsq = {}

    # ----------------------------------------------------------------- accounting
    def _account_forward(self, dense: bool) -> None:
        active = None
        if self._active and not dense:  # threshold path: count the neurons that really ran, token by token
            per_token = torch.stack([a.cpu() for a in self._active.values()]).sum(dim=0)
            per_token = per_token + sum(s for i, s in enumerate(self.sizes) if i not in self._active)
            active = (per_token * self._valid).sum(dim=1).tolist()
        for b, row in enumerate(self.rows):
            tokens = int(self._valid[b].sum())
            row.position += tokens
            row.dense_flops += tokens * self._dense_flops_per_token
            row.neurons_total += tokens * sum(self.sizes)
            row.neurons_executed += active[b] if active is not None else tokens * (
                sum(self.sizes) if dense or not self.prunes else sum(
                    size if full else k for size, full, k in zip(self.sizes, self._full, row.keep)))

    def _row_stats(self, row: _Row) -> SequenceStats:
        ring_bytes = (self._ring_x.numel() * self._ring_x.element_size() + self._ring_a.numel() * 4
                      + self._ring_valid.numel()) / max(1, self.batch)
        row_bytes = sum(s.numel() * 4 for s in row.scores) + sum(k.numel() * 8 for k in row.kept)
        mask_bytes = sum(f.mask.numel() * f.mask.element_size() for f in self.ffns if f.mask is not None)
        compact_bytes = sum(f.compact.nbytes() for f in self.ffns if f.compact is not None)
        return SequenceStats(
            method=self.config.method, sparsity=self.config.sparsity, tokens=row.position,
            prompt_tokens=row.prompt_tokens, keep_counts=list(row.keep), intermediate_sizes=list(self.sizes),
            retraces=list(row.retraces), windows=list(row.drift.records),
            executed_sparsity=1 - row.neurons_executed / row.neurons_total if row.neurons_total else 0.0,
            state_bytes=int(ring_bytes + row_bytes + row.drift.state_bytes() + mask_bytes / max(1, self.batch)),
            compact_weight_bytes=compact_bytes, overhead_flops=dict(row.flops), dense_flops=row.dense_flops,
            retrace_seconds=sum(r.seconds for r in row.retraces),
        )

    def _monitored_layers(self) -> list[int]:
        count = len(self.layers)
        for layer in self.config.monitored_layers:
            if not -count <= layer < count:
                raise ConfigError(f"monitored layer {layer} is out of range for a model with {count} layers")
        return sorted({layer % count for layer in self.config.monitored_layers})


def attach(model: nn.Module, config: DartConfig | None = None, **overrides: Any) -> DartHandle:
    """Make `model` prune its FFN neurons per sequence, in place; `handle.detach()` restores it exactly."""
    config = config or DartConfig()
    if overrides:
        config = config.replace(**overrides)
    if getattr(model, "_dartprune_handle", None) is not None:
        raise RuntimeError("dartprune is already attached to this model; detach that handle first")
    return DartHandle(model, config)
