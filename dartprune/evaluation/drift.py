"""`drift`: a benchmark with ground truth for DART's dynamic part.

Switch sequences are text A (a traced prefix and its continuation) followed by text B of another genre; controls
are text A continued for the same length, where nothing switches. Genres: novels, scripture, poetry, plays
(Gutenberg books of the local data folder), encyclopaedic text (WikiText-2), news (CNN/DailyMail and XSum
articles) and code (modules of Python's own standard library). Every ordered pair of different genres gives one
switch sequence (42), every genre three controls (21); the sequences alternate between two splits, `tune` (to
choose settings on) and `test` (to report them on).

Each sequence is scored teacher-forced in chunks of at most W tokens with the drift monitor live
(docs/algorithm.md §7), and gives: perplexity before and after the switch (and over the first 64 tokens after
it), re-traces before the switch or anywhere in a control (false: nothing changed), the first re-trace after the
switch (detected within 64 tokens, and the delay), and the executed sparsity. Methods are compared paired over the
same sequences, with bootstrap intervals (`comparisons`).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from dartprune.data import BOOK_START, DataNotFoundError, load_summaries, load_text
from dartprune.evaluation.core import PROTOCOL_TEACHER_FORCED, MethodSpec, needs_bos_every_window, progress
from dartprune.evaluation.intervals import paired_perplexities
from dartprune.evaluation.registry import Task, register_task
from dartprune.models import check_context

GENRES: dict[str, list[str]] = {
    "novel": ["gutenberg:austen-emma", "gutenberg:melville-moby_dick", "gutenberg:chesterton-thursday",
              "gutenberg:austen-persuasion", "gutenberg:carroll-alice", "gutenberg:edgeworth-parents",
              "gutenberg:chesterton-brown", "gutenberg:austen-sense", "gutenberg:bryant-stories",
              "gutenberg:chesterton-ball", "gutenberg:burgess-busterbrown"],
    "scripture": ["gutenberg:bible-kjv"],
    "poetry": ["gutenberg:whitman-leaves", "gutenberg:milton-paradise", "gutenberg:blake-poems"],
    "play": ["gutenberg:shakespeare-hamlet", "gutenberg:shakespeare-caesar", "gutenberg:shakespeare-macbeth"],
    "encyclopaedia": ["wikitext2"],
    "news": ["news:cnn_dailymail", "news:xsum"],
    "code": ["python:argparse", "python:typing", "python:dataclasses", "python:email.message", "python:http.client",
             "python:textwrap", "python:csv", "python:pathlib", "python:logging"],
}
CONTROLS_PER_GENRE = 3
DETECTION_WINDOW = 64
# the parts a comparison is paired over: (name, per-sequence mean NLL, kind of sequence)
PARTS = (("after switch", "nll_after", "switch"), ("before switch", "nll_before", "switch"),
         ("controls", "nll_all", "control"))
PROFILES = {"full": {"segment": 256, "genres": None},      # segment: unless --drift-segment says otherwise
            "quick": {"segment": 24, "genres": ["novel", "code", "encyclopaedia"]}}


@dataclass
class DriftSequence:
    name: str
    kind: str                 # "switch" or "control"
    split: str                # "tune" or "test"
    genre_a: str
    genre_b: str
    ids: list[int]
    switch: int               # index of the first token of B (for a control: where B would start)
    sources: tuple[str, ...]  # the text sources it is cut from (A's, then B's)


def source_text(source: str, root) -> str:
    """The running text of a drift source: a text (a book past its title page), or `news:SET`'s articles."""
    if source.startswith("news:"):
        items = load_summaries(source.split(":", 1)[1], None, root)
        bodies = [item["article"].rsplit("Article: ", 1)[-1].split("\n\nSummarize the above")[0] for item in items]
        return "\n\n".join(bodies)
    text = load_text(source, root).text
    return text[BOOK_START:] if source.startswith("gutenberg:") else text


def missing_source(err: DataNotFoundError) -> DataNotFoundError:
    """What the drift benchmark says when one of its sources cannot be read."""
    return DataNotFoundError(f"the drift benchmark reads Gutenberg books, WikiText-2, news articles and Python "
                             f"source; one is missing: {err}")


def check_sources(genres: dict[str, list[str]], root) -> None:
    """Every source can be read (before the model loads), with the message `drift_sequences` gives."""
    try:
        for sources in genres.values():
            for source in sources:
                source_text(source, root)
    except DataNotFoundError as err:
        raise missing_source(err) from err


class TextSegments:
    """Consecutive, never reused token segments of each source (a text is tokenised once, in its first 400k
    characters, past a book's title page)."""

    def __init__(self, tokenizer, root):
        self.tokenizer, self.root = tokenizer, root
        self.tokens: dict[str, list[int]] = {}
        self.cursor: dict[str, int] = {}

    def take(self, source: str, count: int) -> list[int]:
        if source not in self.tokens:
            self.tokens[source] = self.tokenizer(source_text(source, self.root)[:400_000],
                                                 add_special_tokens=False).input_ids
            self.cursor[source] = 0
        start = self.cursor[source]
        if start + count > len(self.tokens[source]):
            raise ValueError(f"{source} has too few tokens for the drift benchmark ({len(self.tokens[source])})")
        self.cursor[source] = start + count
        return self.tokens[source][start:start + count]


def drift_sequences(tokenizer, prefix: int, segment: int, genres: dict[str, list[str]] | None = None, root=None,
                    bos: int | None = None, split: str = "all") -> list[DriftSequence]:
    """Every ordered pair of different genres as a switch sequence (prefix + segment tokens of A, then segment of
    B), and three controls per genre (prefix + 2 segments of A); alternately in the tune and test splits.
    genres: genre -> text sources (default GENRES); split: "all", or only the "tune" or "test" ones."""
    genres = genres or GENRES
    names = list(genres)
    segments = TextSegments(tokenizer, root)
    head = [bos] if bos is not None else []
    use = {g: 0 for g in names}

    def source(genre: str) -> str:
        sources = genres[genre]
        use[genre] += 1
        return sources[(use[genre] - 1) % len(sources)]

    sequences = []
    try:
        for a in names:
            for b in names:
                if a == b:
                    continue
                src_a, src_b = source(a), source(b)
                ids = head + segments.take(src_a, prefix + segment - len(head)) + segments.take(src_b, segment)
                sequences.append(DriftSequence(f"{src_a}>{src_b}", "switch", "", a, b, ids, prefix + segment,
                                               (src_a, src_b)))
        for genre in names:
            for number in range(1, CONTROLS_PER_GENRE + 1):
                src = source(genre)
                ids = head + segments.take(src, prefix + 2 * segment - len(head))
                sequences.append(DriftSequence(f"{src} (control {number})", "control", "", genre, genre, ids,
                                               prefix + segment, (src,)))
    except DataNotFoundError as err:
        raise missing_source(err) from err
    for kind in ("switch", "control"):
        for i, seq in enumerate(s for s in sequences if s.kind == kind):
            seq.split = "tune" if i % 2 == 0 else "test"
    return [s for s in sequences if split in ("all", s.split)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def selected_genres(settings) -> dict[str, list[str]]:
    """The genres and sources that --drift-profile/--drift-sources select, after checking --drift-split (shared
    with the conversation task, which reads the same sources)."""
    if settings.drift_profile not in PROFILES:
        raise ValueError(f"--drift-profile must be one of {sorted(PROFILES)}, got {settings.drift_profile!r}")
    if settings.drift_split not in ("all", "tune", "test"):
        raise ValueError(f"--drift-split must be all, tune or test, got {settings.drift_split!r}")
    return settings.drift_sources or {g: GENRES[g] for g in PROFILES[settings.drift_profile]["genres"] or GENRES}


class ReadsGenres:
    """For the tasks built from the drift benchmark's genres (drift, conversation): their sources are checked before
    the model loads."""

    @classmethod
    def check_data(cls, settings) -> None:
        check_sources(selected_genres(settings), settings.data_dir)


@register_task
class Drift(ReadsGenres, Task):
    name = "drift"
    description = ("drift benchmark: switch sequences across 7 genres and homogeneous controls; false re-traces, "
                   "detection, perplexity before/after the switch, paired intervals")
    primary = ("ppl_after", False)
    summary = ("ppl_before", "ppl_after", "ppl_control", "false_per_1k_control", "detected_64", "executed_sparsity")
    summary_note = ("Drift: ppl columns are geometric means over sequences; false re-traces per 1,000 tokens of the "
                    "controls; detected_64: share of switches followed by a re-trace within 64 tokens.")
    protocol = ("drift: switch = A[:P] + A[P:P+S] + B[:S], control = A[:P+2S] (S = --drift-segment); "
                + PROTOCOL_TEACHER_FORCED + "; false re-traces: monitor triggers before the switch or anywhere in "
                "a control, per 1,000 scored tokens; detected: a trigger within 64 tokens after the switch; "
                "ppl: geometric mean over sequences of each sequence's perplexity")

    def prepare(self) -> None:
        s = self.settings
        genres = selected_genres(s)
        segment = PROFILES[s.drift_profile]["segment"] if s.drift_segment is None else s.drift_segment
        bos = self.tokenizer.bos_token_id if needs_bos_every_window(self.model) else None
        sequences = drift_sequences(self.tokenizer, s.prefix, segment, genres, s.data_dir, bos, s.drift_split)
        check_context(self.model, max((len(q.ids) for q in sequences), default=0),
                      "drift sequences (--prefix + 2 x --drift-segment)")
        limit = s.limit_for("drift")
        if limit is not None:          # a limit keeps the same share of switches and controls
            switches = [q for q in sequences if q.kind == "switch"][:limit]
            controls = [q for q in sequences if q.kind == "control"][:max(1, limit // 2)]
            sequences = switches + controls
        self.sequences = sequences
        self.prefix = s.prefix
        self.records: dict[str, list[dict]] = {}
        self.traces: dict[tuple[str, str, float], object] = {}

    def sources(self) -> dict[str, str | None]:
        """The sources of the sequences scored (a --limit scores fewer)."""
        return {source: None for seq in self.sequences for source in seq.sources}

    def evaluate(self, spec: MethodSpec, session) -> list:
        started = time.perf_counter()
        records = []
        for seq in progress(self.sequences, f"drift {spec.label}"):
            scored = session.score(seq.ids, self.prefix, spec.config.window)
            stats = session.stats()[0]
            nll = -scored.logprobs.double()
            split = seq.switch - (self.prefix + 1)        # scored target j is token prefix + 1 + j
            triggers = stats.trigger_positions
            after = [p - seq.switch for p in triggers if p > seq.switch]
            false = [p for p in triggers if p <= seq.switch] if seq.kind == "switch" else triggers
            records.append({
                "name": seq.name, "kind": seq.kind, "split": seq.split, "genre_a": seq.genre_a,
                "genre_b": seq.genre_b, "switch": seq.switch, "tokens": len(seq.ids),
                "nll_before": float(nll[:split].mean()), "nll_after": float(nll[split:].mean()),
                "nll_after_64": float(nll[split:split + DETECTION_WINDOW].mean()), "nll_all": float(nll.mean()),
                "scored_before": split, "scored_all": int(nll.numel()),
                "false_retraces": len(false), "first_after": after[0] if after else None,
                "triggers": triggers, "executed_sparsity": stats.executed_sparsity,
                "work_sparsity": stats.work_sparsity,
                "retraces": stats.retrace_count})
            if len(self.traces) < 6 and spec.method == "dart" and seq.kind == "switch":
                self.traces[(seq.name, spec.name, spec.sparsity)] = stats
        self.records[spec.label] = records
        self.details += [{"task": self.name, "method": spec.name, "sparsity": spec.sparsity, **r} for r in records]
        return [self.result(spec, self.settings.drift_split, self.metrics(records), len(records), self.prefix,
                            {"executed_sparsity": mean([r["executed_sparsity"] for r in records]),
                             "work_sparsity": mean([r["work_sparsity"] for r in records]),
                             "retraces_mean": mean([r["retraces"] for r in records]), "sequences": len(records)},
                            time.perf_counter() - started, segment=self.sequences[0].switch - self.prefix)]

    @staticmethod
    def metrics(records: list[dict]) -> dict[str, float]:
        """One method's row from its per-sequence records: perplexities before and after the switch and on the
        controls, false re-traces per 1,000 tokens, share of switches caught within 64 tokens, median delay."""
        switches = [r for r in records if r["kind"] == "switch"]
        controls = [r for r in records if r["kind"] == "control"]
        delays = [r["first_after"] for r in switches if r["first_after"] is not None]
        control_tokens = sum(r["scored_all"] for r in controls)
        before_tokens = sum(r["scored_before"] for r in switches)
        return {
            "ppl_before": math.exp(mean([r["nll_before"] for r in switches])),
            "ppl_after": math.exp(mean([r["nll_after"] for r in switches])),
            "ppl_after_64": math.exp(mean([r["nll_after_64"] for r in switches])),
            "ppl_control": math.exp(mean([r["nll_all"] for r in controls])),
            "false_per_1k_control": 1000 * sum(r["false_retraces"] for r in controls) / control_tokens
            if control_tokens else math.nan,
            "false_per_1k_before": 1000 * sum(r["false_retraces"] for r in switches) / before_tokens
            if before_tokens else math.nan,
            "detected_64": mean([float(r["first_after"] is not None and r["first_after"] <= DETECTION_WINDOW)
                                  for r in switches]),
            "median_delay": float(statistics.median(delays)) if delays else math.nan,
            "executed_sparsity": mean([r["executed_sparsity"] for r in records]),
            "switches": len(switches), "controls": len(controls),
        }

    def comparisons(self) -> list[dict]:
        """Paired over sequences: after and before the switch, and the controls."""
        return paired_perplexities({
            part: {label: [r[key] for r in records if r["kind"] == kind] for label, records in self.records.items()}
            for part, key, kind in PARTS})

    def plot_traces(self, out) -> list:
        from dartprune.evaluation.report import plot_drift_traces
        switches = {seq.name: seq.switch for seq in self.sequences}
        return plot_drift_traces(self.traces, switches, out)


def read_details(paths, methods) -> dict[tuple[str, float], dict[tuple[str, int], dict]]:
    """The drift records of `methods` (labels as in the runs: "static", "dart[retrace=dense-steps]") in one or
    several `details.jsonl` files (runs over the same sequences): (method, sparsity) -> (sequence name, n-th of
    that name) -> record. Details files made before controls were numbered name two controls of one source alike:
    the n-th of a name pairs with the n-th. A method at a sparsity found in two of the files must have the same
    records in both (dense, run once by every evaluation; fields that one of them lacks, recorded by a later
    version, are not compared); otherwise it is refused: which run would it be?"""
    records: dict[tuple[str, float], dict[tuple[str, int], dict]] = {}
    origin: dict[tuple[str, float], str] = {}
    for path in paths:
        found: dict[tuple[str, float], dict[tuple[str, int], dict]] = {}
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get("task", "drift") == "drift" and r["method"] in methods:
                runs = found.setdefault((r["method"], r["sparsity"]), {})
                runs[(r["name"], sum(name == r["name"] for name, _ in runs))] = r
        for key, runs in found.items():
            if key in records and not same_records(records[key], runs):
                raise ValueError(f"{key[0]} at sparsity {key[1]:g} is in two of the files given with different "
                                 f"records ({origin[key]} and {path}): give each run once")
            records.setdefault(key, runs)
            origin.setdefault(key, str(path))
    return records


def same_records(a: dict[tuple[str, int], dict], b: dict[tuple[str, int], dict]) -> bool:
    """The same sequences with the same values in every field both runs recorded."""
    return a.keys() == b.keys() and all(a[n][k] == b[n][k] for n in a for k in a[n].keys() & b[n].keys())


def at_executed_sparsity(curve: dict[float, dict], executed: float, key: str) -> float:
    """A method's per-sequence value `key` (a mean NLL) at executed sparsity `executed`, interpolated linearly
    between the two runs of `curve` (nominal sparsity -> that method's record of the same sequence) whose executed
    sparsities bracket it: how a method that runs some tokens dense is compared with the static mask at the same
    executed sparsity."""
    points = sorted((r["executed_sparsity"], r[key]) for r in curve.values())
    if not points:
        raise ValueError("no runs to interpolate between")
    for x, y in points:
        if x == executed:
            return statistics.mean(y2 for x2, y2 in points if x2 == x)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 < executed < x1:
            return y0 + (y1 - y0) * (executed - x0) / (x1 - x0)
    raise ValueError(f"executed sparsity {executed:.4f} is outside the runs given "
                     f"({points[0][0]:.4f} to {points[-1][0]:.4f}): add a run at a lower or higher sparsity")
