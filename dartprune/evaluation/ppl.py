"""`ppl`: perplexity of a long text by the protocol of docs/algorithm.md §7 (traced prefix, teacher-forced chunks
<= W, drift monitor live)."""
from __future__ import annotations

import math
import time

from dartprune.evaluation.core import (
    PROTOCOL_TEACHER_FORCED, MethodSpec, needs_bos_every_window, progress, summarise_stats,
)
from dartprune.models import check_context
from dartprune.data import BOOK_START, Text, load_text
from dartprune.evaluation.intervals import paired_perplexities
from dartprune.evaluation.registry import Task, register_task


def _ppl(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else float("nan")


def text_tokens(tokenizer, text: Text, count: int) -> list[int]:
    """The first `count` tokens of a text (Gutenberg books from character 2000 on, past the title page); errors if
    the text is too short."""
    start = BOOK_START if text.name.startswith("gutenberg:") else 0
    chars = count * 8 + 1000
    ids = tokenizer(text.text[start:start + chars], add_special_tokens=False).input_ids
    if len(ids) < count:
        ids = tokenizer(text.text[start:], add_special_tokens=False).input_ids
    if len(ids) < count:
        raise ValueError(f"{text.name} has only {len(ids)} tokens after character {start}; {count} are needed")
    return ids[:count]


@register_task
class Perplexity(Task):
    name = "ppl"
    description = "perplexity of a long real text in windows: traced prefix, then teacher-forced chunks <= W"
    primary = ("ppl", False)
    protocol = ("ppl windows: non-overlapping windows of the text; in each, " + PROTOCOL_TEACHER_FORCED
                + "; ppl = exp(mean NLL over all scored tokens of all windows)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nll: dict[str, list[float]] = {}       # per method label: each window's mean NLL

    @classmethod
    def check_data(cls, settings) -> None:
        load_text(settings.text, settings.data_dir)

    def prepare(self) -> None:
        s = self.settings
        windows = s.limit_for("ppl") if s.limit_for("ppl") is not None else s.ppl_windows
        if s.prefix < 1 or s.ppl_window < s.prefix + 2:
            defaults = type(s)()
            raise ValueError(f"--prefix ({s.prefix}) must be >= 1 and leave >= 2 tokens in the window "
                             f"(--ppl-window {s.ppl_window}): the window holds the traced prefix and the tokens "
                             f"scored after it; give a longer --ppl-window or a shorter --prefix (the defaults are "
                             f"{defaults.ppl_window} and {defaults.prefix})")
        check_context(self.model, s.ppl_window, "ppl windows (--ppl-window)")
        text = load_text(s.text, s.data_dir)
        self.bos = needs_bos_every_window(self.model)
        body = s.ppl_window - (1 if self.bos else 0)
        ids = text_tokens(self.tokenizer, text, windows * body)
        head = [self.tokenizer.bos_token_id] if self.bos else []
        self.windows = [head + ids[i * body:(i + 1) * body] for i in range(windows)]
        self.source, self.sha256 = text.name, text.sha256

    def sources(self) -> dict[str, str | None]:
        return {self.source: self.sha256}

    def evaluate(self, spec: MethodSpec, session) -> list:
        started = time.perf_counter()
        nll, count, stats, per_window = 0.0, 0, [], []
        for ids in progress(self.windows, f"ppl {spec.label}"):
            scored = session.score(ids, self.settings.prefix, spec.config.window)
            nll -= scored.total
            count += scored.logprobs.numel()
            per_window.append(_ppl(-scored.total, scored.logprobs.numel()))
            stats += session.stats()
        self.nll[spec.label] = [math.log(p) for p in per_window]
        self.details.append({"task": self.name, "method": spec.name, "sparsity": spec.sparsity,
                             "window_ppl": per_window,
                             "retrace_positions": [s.retrace_positions for s in stats]})
        return [self.result(spec, self.source, {"ppl": _ppl(nll, count), "scored_tokens": count},
                            len(self.windows), self.settings.prefix, summarise_stats(stats),
                            time.perf_counter() - started, window_tokens=self.settings.ppl_window,
                            bos_every_window=self.bos, text=self.source, text_sha256=self.sha256)]

    def comparisons(self) -> list[dict]:
        """Paired over windows (each scores as many tokens)."""
        return paired_perplexities({"windows": self.nll})
