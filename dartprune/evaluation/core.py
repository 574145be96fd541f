"""What every evaluation task shares: loading, method specs, the session that runs one method (the native loop
where the model has one, else Hugging Face with the engine attached), the teacher-forced scoring protocol
(docs/algorithm.md §7), and progress bars."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from dartprune.architectures import get_adapter
from dartprune.decode.generate import Generator, SamplingParams
from dartprune.engine import DartConfig, SequenceStats
from dartprune.engine.config import ConfigError, check_no_method_or_sparsity, parse_settings
from dartprune.models import load_model, progress_off
from dartprune.methods import METHODS


# ----------------------------------------------------------------------------------------------- environment
def progress(iterable: Iterable, desc: str, total: int | None = None, leave: bool = False,
             disable: bool | None = None, **kwargs: Any):
    """A tqdm bar on stderr, also when stderr is a log file; DARTPRUNE_NO_PROGRESS=1 turns them off."""
    if progress_off():
        disable = True
    elif disable is None:
        disable = False
    return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True, file=sys.stderr,
                disable=disable, **kwargs)


def load_for_eval(name: str, dtype: str = "float32"):
    """(model, tokenizer) for an alias / local folder / Hub id, in eval mode."""
    model, tokenizer = load_model(name, dtype=dtype)
    model.eval()
    return model, tokenizer


def needs_bos_every_window(model) -> bool:
    """Whether every window/sequence starts with BOS: the model's family says so (Gemma is trained with BOS first
    and degrades badly without it)."""
    return get_adapter(model).bos_every_window


# ----------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    """One evaluated configuration: a method at a sparsity, with the DartConfig it runs. `variant` names settings
    that differ from the run's (`dart[detector=paper]`), so two configurations of one method compare in one run."""

    method: str
    sparsity: float
    config: DartConfig = field(compare=False, hash=False)
    variant: str = ""

    @property
    def name(self) -> str:
        return f"{self.method}[{self.variant}]" if self.variant else self.method

    @property
    def label(self) -> str:
        return method_label(self.name, self.sparsity)


def method_label(name: str, sparsity: float) -> str:
    """How tables, plots and comparisons name a method at a sparsity: `dart@0.5`, `dart[window=8]@0.7`, `dense`."""
    return "dense" if name == "dense" else f"{name}@{sparsity:g}"


def parse_method(text: str) -> tuple[str, str, dict[str, Any]]:
    """'dart' or 'dart[key=value;key=value]' -> (method, variant text, settings)."""
    method, bracket, rest = text.partition("[")
    if not bracket:
        return text, "", {}
    if not rest.endswith("]") or not rest[:-1].strip():
        raise ConfigError(f"a method variant looks like dart[key=value;key=value], got {text!r}")
    variant = rest[:-1]
    settings = parse_settings([item for item in variant.split(";") if item.strip()])
    for key in ("method", "sparsity"):
        if key in settings:
            raise ConfigError(f"a variant cannot set {key} ({text!r})")
    return method, variant, settings


def method_specs(methods: list[str], sparsities: list[float], extra: dict[str, Any] | None = None,
                 include_dense: bool = True, calibration: dict[str, str] | None = None) -> list[MethodSpec]:
    """Dense first (once, sparsity 0: it does not depend on the sparsity), then every method at every sparsity.

    methods: names, each optionally with its own settings over `extra` (`dart[detector=paper;window=5]`).
    calibration: method -> calibration file, for the calibrated baselines (wanda-static, threshold)."""
    extra = dict(extra or {})
    calibration = calibration or {}
    check_no_method_or_sparsity(extra)
    parsed = [parse_method(m) for m in methods]
    unknown = [m for m, _, _ in parsed if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; available: {sorted(METHODS)}")
    specs = []
    if include_dense or "dense" in methods:
        specs.append(MethodSpec("dense", 0.0, DartConfig.from_dict({**extra, "method": "dense", "sparsity": 0.0})))
    for method, variant, settings in parsed:
        if method == "dense":
            continue
        for sparsity in sparsities:
            values = {**extra, **settings, "method": method, "sparsity": float(sparsity)}
            if method in calibration:
                values["calibration_file"] = calibration[method]
            specs.append(MethodSpec(method, float(sparsity), DartConfig.from_dict(values), variant))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"a method is listed twice: {sorted(x for x in set(labels) if labels.count(x) > 1)}")
    return specs


class Session:
    """One method spec on one model: teacher-forced scoring and greedy generation, dense or pruned.

    It runs dartprune's native loop where the model has one (and the method is not per-token), else Hugging Face
    with the engine attached; both compute the same (tested). `close()` restores the model."""

    def __init__(self, model, tokenizer, config: DartConfig, loop: str = "auto"):
        self.generator = Generator(model, tokenizer, config, loop=loop)
        self.model, self.tokenizer, self.config = model, tokenizer, config

    @property
    def engine(self):
        return self.generator.engine

    @property
    def loop(self) -> str:
        return self.generator.loop

    def stats(self) -> list[SequenceStats]:
        """The statistics of the last sequence."""
        return self.engine.stats()

    def close(self) -> None:
        self.generator.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.no_grad()
    def score(self, ids: list[int] | torch.Tensor, traced: int, chunk: int,
              on_traced: Callable[[], None] | None = None) -> Scored:
        """log p(ids[t] | ids[:t]) for t in traced+1 .. len(ids)-1 (see PROTOCOL_TEACHER_FORCED)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        native = self.generator.native
        if native is None:
            return teacher_forced(hf_feed(self.model, ids), ids, traced, chunk, on_traced)
        native.reset()
        return teacher_forced(lambda start, end: native.forward(ids[start:end]), ids, traced, chunk, on_traced)

    @torch.no_grad()
    def score_turns(self, parts: list[tuple[list[int], bool]], chunk: int) -> list[torch.Tensor]:
        """A conversation, teacher-forced as one sequence. `parts` are (tokens, is_reply): a turn is fed at once
        (the first as the prompt, later ones as new turns: dense and traced); a reply is fed in chunks of <= `chunk`
        tokens with the monitor live, and every one of its tokens is scored (the first from the turn before it).
        A reply's last token is fed with the next turn, as in a chat. Returns each reply's log-probabilities."""
        if not parts or any(not tokens for tokens, _ in parts) or any(
                is_reply != (i % 2 == 1) for i, (_, is_reply) in enumerate(parts)):
            raise ValueError("a conversation alternates turns and replies, starting with a turn; no part is empty")
        ids = torch.tensor([t for tokens, _ in parts for t in tokens], dtype=torch.long)
        native, handle = self.generator.native, self.generator.handle
        cache = None
        if native is not None:
            native.reset()

        def feed(start: int, end: int, new_turn: bool) -> torch.Tensor:
            nonlocal cache
            if native is not None:
                return native.forward(ids[start:end], new_turn=new_turn)
            if new_turn:
                handle.new_turn()
            out = self.model(input_ids=ids[None, start:end], attention_mask=torch.ones(1, end, dtype=torch.long),
                             cache=cache, use_cache=True)
            cache = out.cache
            return out.logits[0].float()

        fed = offset = 0                     # tokens fed so far; where the current part starts
        replies, last = [], None
        for tokens, is_reply in parts:
            start, end = offset, offset + len(tokens)
            if is_reply:
                logprobs, greedy = [], []
                _collect(last, ids[start:start + 1], logprobs, greedy)
                for begin in range(start, end - 1, chunk):
                    stop = min(begin + chunk, end - 1)
                    _collect(feed(begin, stop, False), ids[begin + 1:stop + 1], logprobs, greedy)
                replies.append(torch.cat(logprobs))
                fed = end - 1
            else:
                last = feed(fed, end, new_turn=fed > 0)[-1:]
                fed = end
            offset = end
        return replies

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, stop: list[str] | None = None) -> tuple[str, int]:
        """Greedy continuation of `ids`: (text cut at the first stop string, new token count)."""
        result = self.generator.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, stop=tuple(stop or ())))
        return result.text.strip(), len(result.tokens)


def _collect(logits: torch.Tensor, targets: torch.Tensor, logprobs: list, greedy: list) -> None:
    logp = logits.float().log_softmax(-1)
    logprobs.append(logp.gather(1, targets[:, None].to(logp.device))[:, 0].cpu())
    greedy.append((logp.argmax(-1) == targets.to(logp.device)).cpu())


def _check_protocol(total: int, traced: int, chunk: int) -> None:
    if total < 2 or not 0 <= traced < total - 1:
        raise ValueError(f"need at least one scored token: {total} tokens, traced prefix {traced}")
    if chunk < 1:
        raise ValueError("chunk must be >= 1")


def summarise_stats(stats: list) -> dict[str, float]:
    """Mean engine statistics over the sequences of one run (docs/algorithm.md §6)."""
    if not stats:
        return {}
    n = len(stats)
    return {
        "retraces_mean": sum(s.retrace_count for s in stats) / n,
        "executed_sparsity": sum(s.executed_sparsity for s in stats) / n,
        "overhead_fraction": sum(s.overhead_fraction for s in stats) / n,
        "state_bytes_max": max(s.state_bytes for s in stats),
        "sequences": n,
    }


# ----------------------------------------------------------------------------------------------- scoring protocol
@dataclass
class Scored:
    """Per-target-token log-probabilities and whether each target was the argmax."""

    logprobs: torch.Tensor
    greedy: torch.Tensor

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all())


PROTOCOL_TEACHER_FORCED = (
    "prefill ids[:P] as a new sequence (dense, traced: the mask comes from these tokens only), then feed "
    "ids[P:-1] through the KV cache in chunks of <= W tokens with the drift monitor live; every scored token "
    "ids[P+1:] is predicted by a pruned forward (W = DartConfig.window)")


Feed = Callable[[int, int], torch.Tensor]    # (start, end) -> logits [end - start, vocab] of ids[start:end]


def forced_pieces(total: int, traced: int, chunk: int) -> list[tuple[int, int]]:
    """The (start, end) pieces PROTOCOL_TEACHER_FORCED feeds a sequence of `total` tokens in: the traced prefix
    (at least one token), then the rest but the last token in chunks of at most `chunk`."""
    first = max(traced, 1)
    return [(0, first)] + [(start, min(start + chunk, total - 1)) for start in range(first, total - 1, chunk)]


def hf_feed(model, ids: torch.Tensor) -> Feed:
    """Feeds pieces of `ids` to a Hugging Face model one after another through its KV cache."""
    cache = None

    def feed(start: int, end: int) -> torch.Tensor:
        nonlocal cache
        out = model(input_ids=ids[None, start:end], attention_mask=torch.ones(1, end, dtype=torch.long),
                    cache=cache, use_cache=True)
        cache = out.cache
        return out.logits[0].float()
    return feed


@torch.no_grad()
def teacher_forced(feed: Feed, ids: torch.Tensor, traced: int, chunk: int,
                   on_traced: Callable[[], None] | None = None) -> Scored:
    """log p(ids[t] | ids[:t]) for t in traced+1 .. len(ids)-1 (see PROTOCOL_TEACHER_FORCED), feeding `feed` the
    pieces of `forced_pieces`.

    traced = 0 (a one-token context) prefills ids[:1] and, as the only exception, takes the prediction of ids[1]
    from that dense prefill. `on_traced` is called right after the traced prefill (tests read the mask there).
    """
    _check_protocol(ids.numel(), traced, chunk)
    (_, first), *rest = forced_pieces(ids.numel(), traced, chunk)
    logits = feed(0, first)
    if on_traced is not None:
        on_traced()
    logprobs, greedy = [], []
    if traced == 0:
        _collect(logits[-1:], ids[1:2], logprobs, greedy)
    for start, end in rest:
        _collect(feed(start, end), ids[start + 1:end + 1], logprobs, greedy)
    return Scored(torch.cat(logprobs), torch.cat(greedy))


def teacher_forced_logprobs(model, ids: list[int] | torch.Tensor, traced: int, chunk: int,
                            on_traced: Callable[[], None] | None = None) -> Scored:
    """`teacher_forced` on a Hugging Face model (dartprune attached or not)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    return teacher_forced(hf_feed(model, ids), ids, traced, chunk, on_traced)




def encode_pair(tokenizer, context: str, continuation: str, bos: bool = False) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces move to the continuation; encode the whole, cut at the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    prefix = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    return prefix + ctx, whole[len(ctx):]
