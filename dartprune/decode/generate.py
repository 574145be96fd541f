"""Generation: prefill, one forward per new token, sampling, streaming text, EOS and stop strings.

`Generator` holds a model, its engine (when pruning) and the loop that runs it: the native loop for the Llama
and Gemma families, else Hugging Face `generate` with the engine attached. Both give the same `Generation`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from dartprune.decode.model import NativeModel, native_runs, native_supported
from dartprune.engine import DartConfig, Engine, SequenceStats, attach
from dartprune.engine.config import check_seed
from dartprune.models import check_context

LOOPS = ("auto", "native", "hf")


def check_text(text: str, what: str) -> str:
    """`text`, or a ValueError naming `what` where it holds a lone surrogate (bytes that were not UTF-8 where the
    text was read, or a JSON escape of half a character), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid Unicode: character {err.start} is {text[err.start]!r}, half of a "
                         "UTF-16 pair or a byte that was not UTF-8; give the text as UTF-8") from None
    return text


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.
    seed: the same draws for the same seed within a loop (the native and the Hugging Face loop draw differently).
    ignore_eos: generate exactly max_new_tokens (benchmarks)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.seed is not None:
            check_seed(self.seed)


@dataclass
class Generation:
    """One generated continuation and how it went."""

    text: str
    tokens: list[int]
    finish_reason: str                 # "stop" (stop string), "eos", "length" or "interrupted"
    prompt_tokens: int
    ttft_s: float                      # prompt in, first token out
    step_s: list[float] = field(default_factory=list)   # each later token
    stats: SequenceStats | None = None
    loop: str = "native"               # the loop that ran: "native" or "hf"

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        """New tokens over the whole time (prompt included), as the benchmark reports it."""
        total = self.ttft_s + self.decode_s
        return len(self.tokens) / total if total else 0.0

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first."""
        return self.decode_s / max(1, len(self.step_s))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from [vocab] float32 logits: argmax, or temperature, then top-k, then top-p (the order of
    Hugging Face's logits warpers)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if params.top_p < 1:
        ordered, index = logits.sort(descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= params.top_p     # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, index, drop), -float("inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


class TextStream:
    """Turns tokens into text as they come: emits what is final, holds back an incomplete character and any
    tail that could still become a stop string, and finds stop strings."""

    def __init__(self, tokenizer, stop: Iterable[str], on_text: Callable[[str], None] | None):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.on_text = on_text
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0

    def add(self, token: int) -> bool:
        """Add a token; True when a stop string has appeared (the text is cut before it)."""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self._send(len(self.text))
                return True
        if not self.text.endswith("\ufffd"):
            self._send(len(self.text) - self.hold)
        return False

    def finish(self) -> None:
        self._send(len(self.text))

    def _send(self, end: int) -> None:
        if end > self.sent:
            if self.on_text is not None:
                self.on_text(self.text[self.sent:end])
            self.sent = end


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


class Generator:
    """A model ready to generate, dense or pruned, many times. `close()` restores the model.

    loop: "native" (dartprune's loop; Llama and Gemma families), "hf" (`model.generate` with the engine attached)
    or "auto" (native where supported)."""

    def __init__(self, model: nn.Module, tokenizer, config: DartConfig | None = None, loop: str = "auto"):
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
        config = config or DartConfig(method="dense", sparsity=0.0)
        native = native_supported(model) and native_runs(config.method)
        if loop == "native" and not native:
            raise ValueError(f"the native loop does not run {model.config.model_type!r} models with method "
                             f"{config.method!r}; use loop=\"hf\" (--loop hf on the command line)")
        self.loop = "native" if loop == "native" or (loop == "auto" and native) else "hf"
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos = eos_ids(model, tokenizer)
        self.closed = False
        if self.loop == "native":
            self.engine = Engine(model, config, widened=True)
            try:
                self.native = NativeModel(model, self.engine)
            except BaseException:
                self.engine.close()            # the model as it was: its weights back in order, free for others
                raise
            self.handle = None
        else:
            self.handle = attach(model, config)
            self.engine = self.handle.engine
            self.native = None

    def close(self) -> None:
        """Restore the model; the generator cannot be used afterwards. Closing twice does nothing."""
        if self.closed:
            return
        if self.handle is not None:
            self.handle.detach()
        else:
            self.engine.close()
        self.closed = True

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        check_context(self.model, prompt_tokens + max_new_tokens,
                      f"a prompt of {prompt_tokens} tokens and {max_new_tokens} new tokens")

    def generate(self, ids: torch.Tensor | list[int], params: SamplingParams = SamplingParams(),
                 on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Generation:
        """Continue the prompt `ids` ([tokens] or [1, tokens]) as a new sequence. At the end the weights go back
        into their own order (`Engine.end_sequence`), off the next prompt's time; `continue_` may still extend
        the sequence. `should_stop`: as in `continue_`."""
        if self.closed:
            raise RuntimeError("this Generator is closed (its model was restored); build a new one")
        if isinstance(ids, str):
            raise TypeError("generate takes token ids; encode the text with the tokenizer first")
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
            raise ValueError(f"generate takes one prompt ([tokens] or [1, tokens]), got shape {tuple(ids.shape)}; "
                             "for a batch, attach the engine and call model.generate")
        ids = ids.reshape(-1)
        if ids.numel() == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model.get_input_embeddings().num_embeddings
        outside = ids[(ids < 0) | (ids >= vocab)]
        if outside.numel():
            raise ValueError(f"token id {int(outside[0])} is outside the model's vocabulary of {vocab} ids")
        self.check_length(ids.numel(), params.max_new_tokens)
        try:
            if self.loop == "hf":
                return self._generate_hf(ids, params, on_text, should_stop)
            self.native.reset()
            return self.continue_(ids, params, on_text, new_turn=False, should_stop=should_stop)
        finally:
            self.engine.end_sequence()

    @torch.inference_mode()
    def continue_(self, ids: torch.Tensor, params: SamplingParams, on_text: Callable[[str], None] | None = None,
                  new_turn: bool = True, should_stop: Callable[[], bool] | None = None) -> Generation:
        """Native loop: feed `ids` after what the sequence holds (a new conversation turn when `new_turn`), then
        generate. The sequence keeps its cache for the next call. `should_stop()` is asked after every token (a
        reply interrupted that way ends with finish reason "interrupted")."""
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stream = TextStream(self.tokenizer, params.stop, on_text)
        start = time.perf_counter()
        self.native.reserve(self.native.cache.length + ids.numel() + params.max_new_tokens)
        logits = self.native.forward(ids, new_turn=new_turn and self.native.cache.length > 0, last_only=True)[-1]
        token = sample(logits, params, generator)
        ttft = time.perf_counter() - start
        steps: list[float] = []
        while True:
            reason = self._ends(token, stream, params)
            if reason is not None:
                break
            if len(stream.tokens) >= params.max_new_tokens:
                reason = "length"
                break
            if should_stop is not None and should_stop():
                reason = "interrupted"
                break
            start = time.perf_counter()
            token = sample(self.native.forward(torch.tensor([token]))[-1], params, generator)
            steps.append(time.perf_counter() - start)
        stream.finish()
        return Generation(text=stream.text, tokens=stream.tokens, finish_reason=reason, prompt_tokens=ids.numel(),
                          ttft_s=ttft, step_s=steps, stats=self.engine.stats()[0], loop="native")

    def _ends(self, token: int, stream: TextStream, params: SamplingParams) -> str | None:
        """Why the reply ends at this token ("eos", or "stop" when the text now ends in a stop string), else
        None after streaming it."""
        if token in self.eos and not params.ignore_eos:
            return "eos"
        return "stop" if stream.add(token) else None

    @torch.inference_mode()
    def _generate_hf(self, ids: torch.Tensor, params: SamplingParams, on_text: Callable[[str], None] | None,
                     should_stop: Callable[[], bool] | None = None) -> Generation:
        """`model.generate` with the engine attached; each token is streamed and checked for the end of the reply
        (EOS, a stop string, `should_stop`) as it comes, as the native loop does."""
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer
        stream = TextStream(self.tokenizer, params.stop, on_text)
        times: list[float] = []
        ended: list[str] = []                               # why the reply ended, once it has
        ends = self._ends

        class Clock(BaseStreamer):
            """Timestamps each new token (generate calls `put` with the prompt first)."""

            def put(self, value: torch.Tensor) -> None:
                times.append(time.perf_counter())

            def end(self) -> None:
                pass

        class Ended(StoppingCriteria):
            """Streams each new token and ends the reply where the native loop would: transformers asks this as
            soon as the token is chosen (before the streamer), so no forward runs after the last token."""

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
                if not ended:
                    reason = ends(int(input_ids[0, -1]), stream, params)
                    if reason is None and len(stream.tokens) >= params.max_new_tokens:
                        reason = "length"
                    if reason is None and should_stop is not None and should_stop():
                        reason = "interrupted"
                    if reason is not None:
                        ended.append(reason)
                return torch.full((input_ids.shape[0],), bool(ended), dtype=torch.bool, device=input_ids.device)

        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k or None) if params.temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        extra = {"eos_token_id": []} if params.ignore_eos else {}    # EOS sampled like any token, as natively
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        device = self.model.get_input_embeddings().weight.device
        start = time.perf_counter()
        # transformers samples from the global generator: seeded in a fork, so the caller's draws are not touched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                   enabled=params.seed is not None):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            self.model.generate(ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                                max_new_tokens=params.max_new_tokens, streamer=Clock(), pad_token_id=pad,
                                stopping_criteria=StoppingCriteriaList([Ended()]), **sampling, **extra)
        stream.finish()
        marks = times[1:]                                   # the first put is the prompt
        steps = [b - a for a, b in zip(marks, marks[1:])]
        return Generation(text=stream.text, tokens=stream.tokens, finish_reason=ended[0] if ended else "length",
                          prompt_tokens=ids.numel(), ttft_s=(marks[0] - start) if marks else 0.0, step_s=steps,
                          stats=self.engine.stats()[0], loop="hf")
