"""`attach(model, config)`: drive the engine from a Hugging Face model's own forward, so `model.generate` (KV cache,
sampling, streamers, stopping criteria) works unchanged.

Forward hooks on the model tell the engine where a forward begins and ends; a forward over an empty cache starts
a new sequence, and a `model.generate` call ends its sequence when it returns: the neurons go back into their own
order then, not in the next prompt's first token. A generate that continues the cache puts its kept sets back
first (each continued turn pays both moves, tens of milliseconds on a small model). The FFN modules are stood in
for by `FFNTaps` (dense forwards report what they traced; pruned forwards call `Engine.ffn`), and the monitored
layers' attention modules report their output.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from dartprune.engine.config import DartConfig
from dartprune.engine.engine import Engine, Step
from dartprune.engine.stats import SequenceStats
from dartprune.engine.taps import FFNTaps


class DartHandle:
    """Owns the hooks and the engine of one attached model; `detach()` restores the model exactly."""

    def __init__(self, model: nn.Module, config: DartConfig):
        self.model = model
        self.config = config
        self._hooks: list = []
        self._step: Step | None = None
        self._generate: tuple[Callable, Callable | None] | None = None    # (our wrapper, the user's own attribute)
        self.taps: FFNTaps | None = None
        self.engine = Engine(model, config)
        try:            # whatever fails from here leaves the model as it was (its weights back in order)
            if self.engine.prunes:
                self.taps = FFNTaps(model, self.engine.trace, pruned=self.engine.ffn,
                                    on_masks=self.engine.rows_on_masks)
            self._hooks += [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                            model.register_forward_hook(self._after_forward, with_kwargs=True)]
            # on each layer and FFN, so that the state dict of any module holding one (the model's too) has them in
            # their own order
            ffns = self.taps.stand_ins if self.taps is not None else []
            self._hooks += [module.register_state_dict_pre_hook(self._own_order)
                            for module in [*self.engine.layers, *ffns]]
            adapter = self.engine.adapter
            self._hooks += [adapter.attention(self.engine.layers[layer]).register_forward_hook(self._attention(j))
                            for j, layer in enumerate(self.engine.monitored)]
            if self.engine.prunes and callable(getattr(model, "generate", None)):
                wrapper = self._generate_then_end(model.generate)
                self._generate = (wrapper, vars(model).get("generate"))
                model.generate = wrapper
        except BaseException:
            self.detach()
            raise
        model.dartprune_handle = self

    # ----------------------------------------------------------------- public
    def stats(self) -> list[SequenceStats]:
        """One `SequenceStats` per row of the current (or last) sequence."""
        return self.engine.stats()

    def reset(self) -> None:
        """Forget the current sequence; the next forward over an empty cache starts a new one anyway."""
        self.engine.reset()

    def new_turn(self) -> None:
        """Call before `model.generate(..., cache=cache)` continues a conversation with a new user turn:
        the turn's tokens are traced dense like a prompt and the masks updated from them."""
        self.engine.new_turn()

    def end_sequence(self) -> None:
        """The sequence will not go on: its neurons go back into their own order now (`model.generate` does this
        when it returns; call it after driving the model's forward yourself)."""
        self.engine.end_sequence()

    def detach(self) -> None:
        """Restore the exact original model: its own FFN modules, weights in their order, no hooks, no state."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._generate is not None:
            wrapper, own = self._generate
            if vars(self.model).get("generate") is wrapper:     # not replaced by someone else since
                if own is not None:
                    self.model.generate = own
                else:
                    del self.model.generate
            self._generate = None
        if self.taps is not None:
            self.taps.remove()
            self.taps = None
        self.engine.close()
        self.model.dartprune_handle = None

    def __enter__(self) -> DartHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ----------------------------------------------------------------- hooks
    def _generate_then_end(self, generate: Callable) -> Callable:
        """`generate`, then the sequence ends: its neurons go back into their own order off the next prompt's
        first token."""
        @functools.wraps(generate)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            given = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None)   # by name or place
            settings = given or getattr(self.model, "generation_config", None)

            def setting(name: str, default: Any) -> Any:
                value = kwargs.get(name)
                return value if value is not None else getattr(settings, name, default)

            speculative = [name for name, on in (
                ("assisted decoding (assistant_model)", kwargs.get("assistant_model") is not None),
                ("prompt lookup decoding", bool(setting("prompt_lookup_num_tokens", None))),
                ("self-speculative decoding (assistant_early_exit)", bool(setting("assistant_early_exit", None))),
            ) if on]
            if speculative:
                raise ValueError(f"{speculative[0]} is not supported under dartprune: its first forward brings the "
                                 "prompt with guessed tokens, which would be traced (and run dense) as if they "
                                 "were the prompt, and rejected guesses would stay in the per-row state")
            if (setting("num_beams", 1) or 1) > 1:
                self._check_beam_search(args, kwargs)
            use_cache = setting("use_cache", True)
            if use_cache is False and not self.config.prune_prefill:
                raise ValueError("dartprune prunes the steps that follow a prompt through the KV cache; without "
                                 "it (use_cache=False) every step is a new prompt, which runs dense: keep the cache "
                                 "(or set prune_prefill=True, which runs each step's prompt on masks too: more "
                                 "work than dense where the prompt is traced first)")
            try:
                return generate(*args, **kwargs)
            finally:
                self.engine.end_sequence()
        return wrapped

    def _check_beam_search(self, args: tuple, kwargs: dict) -> None:
        """Beam search reorders the rows every step, which per-row state that changes while generating does not
        follow: DART's (re-traces, drift), and any method's while a row still traces (a prompt shorter than
        min_trace_tokens). Refused then."""
        if self.engine.follows_drift:
            raise ValueError(f"beam search (num_beams > 1) is not supported with method {self.config.method!r}: "
                             "its per-row state (recent tokens, drift monitor, re-traced kept sets) follows one "
                             "continuous sequence per row, and beam search reorders rows. Use greedy or sampling "
                             "decoding, or a method whose kept sets do not change while generating (static, griffin)")
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if ids is None:
            ids = kwargs.get("inputs_embeds")        # [batch, tokens, hidden]: its first two dims are the prompt's
        mask = kwargs.get("attention_mask")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            lengths = mask.sum(dim=1) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else \
                torch.full((ids.shape[0],), ids.shape[1])
            if int(lengths.min()) < self.config.min_trace_tokens:
                raise ValueError(f"beam search needs every prompt to bring min_trace_tokens = "
                                 f"{self.config.min_trace_tokens} tokens: a shorter one goes on tracing while beam "
                                 f"search reorders the rows (this batch's shortest has {int(lengths.min())})")

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        reference = ids if ids is not None else kwargs.get("inputs_embeds")
        if reference is None:
            raise ValueError("dartprune needs input_ids or inputs_embeds in the forward call")
        batch, tokens = reference.shape[0], reference.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        valid = mask[:, -tokens:].bool() if mask is not None and mask.dim() == 2 else torch.ones(
            batch, tokens, dtype=torch.bool)
        engine = self.engine
        if cache is None or cache.get_seq_length() == 0:
            engine.start(batch)
            if engine.prunes_prompt(valid):
                if engine.traces_prompt:                # a dense pass that traces the prompt first
                    self._set_taps(engine.begin_forward(valid, trace_only=True))
                    with torch.no_grad():
                        self.model.base_model(input_ids=ids, inputs_embeds=kwargs.get("inputs_embeds"),
                                              attention_mask=mask, position_ids=kwargs.get("position_ids"),
                                              use_cache=False)
                    engine.end_forward()
                else:
                    engine.build_untraced()
                self._set_taps(engine.begin_forward(valid, replay=True))
                return
        self._set_taps(engine.begin_forward(valid))

    def _set_taps(self, step: Step) -> None:
        self._step = step
        if self.taps is not None:
            self.taps.set_mode(step.dense, step.importance, mixed=bool(step.on_masks))

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._step is not None:
            self.engine.end_forward()
            self._step = None

    def _own_order(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        """A state dict (`save_pretrained` too) holds the weights in their own order, even mid-sequence: the
        sequence ends here (a forward that continues it moves its kept neurons back in first)."""
        self.engine.end_sequence()

    def _attention(self, j: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._step is not None and self._step.monitor:
                self.engine.observe_attention(j, output[0] if isinstance(output, tuple) else output)
        return hook


def attach(model: nn.Module, config: DartConfig | dict[str, Any] | None = None, **overrides: Any) -> DartHandle:
    """Make `model` prune its FFN neurons per sequence, in place; `handle.detach()` restores it exactly.
    config: a DartConfig, or a dict of its fields (as `DartConfig.from_dict` reads them)."""
    if isinstance(config, dict):
        config = DartConfig.from_dict(config)
    elif config is not None and not isinstance(config, DartConfig):
        raise TypeError(f"config must be a DartConfig or a dict of its fields, got {type(config).__name__}")
    config = config or DartConfig()
    if overrides:
        config = config.replace(**overrides)
    return DartHandle(model, config)
