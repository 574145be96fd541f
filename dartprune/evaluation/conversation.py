"""`conversation`: multi-turn dialogues whose turns change topic, for the mask a conversation runs on.

Each dialogue has three user turns from three different genres (the drift benchmark's sources): the user gives a
passage ("Continue this text:" and 96 tokens of it) and the reference reply is the passage's own continuation
(64 tokens). A dialogue is rendered with the tokenizer's chat template (base models without one get a plain
"User: / Assistant:" transcript) and scored teacher-forced as one sequence whose cache is kept across turns
(`Session.score_turns`): each user turn is fed at once, dense and traced; each reply is fed pruned in chunks of W
tokens with the drift monitor live, and every reply token is scored. DART rebuilds its masks from each new turn
(`DartConfig.turn_blend` keeps a share of the earlier scores); static keeps the mask of the first turn. Both run
the turns' tokens dense, so they execute the same sparsity up to DART's re-scoring.

Ordered genre triples alternate between a `tune` and a `test` split (`--drift-split`), like the drift benchmark.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

from dartprune.data import DataNotFoundError
from dartprune.decode.chat import has_chat_template, render_chat
from dartprune.evaluation.core import MethodSpec, needs_bos_every_window, progress
from dartprune.evaluation.drift import ReadsGenres, TextSegments, mean, selected_genres
from dartprune.evaluation.intervals import paired_perplexities
from dartprune.evaluation.registry import Task, register_task
from dartprune.models import check_context

TURNS = 3
SIZES = {"full": (96, 64), "quick": (16, 12)}          # profile -> (passage tokens per turn, reply tokens)
DIALOGUES = 30
ASK = "Continue this text:\n\n"


@dataclass
class Dialogue:
    split: str
    genres: tuple[str, ...]
    parts: list[tuple[list[int], bool]]     # (tokens, is_reply), alternating, starting with the first user turn
    sources: tuple[str, ...]                # each turn's text source

    @property
    def name(self) -> str:
        return " > ".join(self.sources)


def _split_text(tokenizer, messages: list[dict[str, str]], bos: bool) -> list[str]:
    """The dialogue's text cut at every turn/reply boundary (template text, or a plain transcript)."""
    if has_chat_template(tokenizer):
        texts = []
        for k in range(1, len(messages) + 1):
            texts.append(render_chat(tokenizer, messages[:k], add_generation_prompt=k % 2 == 1, tokenize=False))
        parts, done = [], ""
        for text in texts:
            if not text.startswith(done):
                raise ValueError("the chat template renders a conversation's earlier turns differently once it "
                                 "grows; the conversation task needs each rendering to extend the one before")
            parts.append(text[len(done):])
            done = text
        return parts
    head = tokenizer.bos_token if bos and tokenizer.bos_token else ""
    parts = []
    for k, message in enumerate(messages):
        if message["role"] == "user":
            parts.append(("" if k else head) + ("\n\n" if k else "") + f"User: {message['content']}\n\nAssistant:")
        else:
            parts.append(" " + message["content"])
    return parts


def dialogues(tokenizer, passage: int, reply: int, genres: dict[str, list[str]], root=None, bos: bool = False,
              count: int = DIALOGUES) -> list[Dialogue]:
    """`count` dialogues over ordered triples of different genres (spread over all triples), alternately in the
    tune and test splits; every passage and reply is text no other dialogue uses."""
    names = list(genres)
    if len(names) < TURNS:
        raise ValueError(f"the conversation task needs at least {TURNS} genres, got {names}")
    triples = list(itertools.permutations(names, TURNS))
    step = max(1, len(triples) // count)
    segments = TextSegments(tokenizer, root)
    use = {g: 0 for g in names}
    out = []
    try:
        for i, triple in enumerate(triples[::step][:count]):
            messages, sources = [], []
            for genre in triple:
                source = genres[genre][use[genre] % len(genres[genre])]
                use[genre] += 1
                sources.append(source)
                text = segments.take(source, passage + reply)
                messages.append({"role": "user", "content": ASK + tokenizer.decode(text[:passage]).strip()})
                messages.append({"role": "assistant", "content": tokenizer.decode(text[passage:]).strip()})
            texts = _split_text(tokenizer, messages, bos)
            parts = [(tokenizer(t, add_special_tokens=False).input_ids, k % 2 == 1) for k, t in enumerate(texts)]
            out.append(Dialogue("tune" if i % 2 == 0 else "test", triple, parts, tuple(sources)))
    except DataNotFoundError as err:
        raise DataNotFoundError(f"the conversation task reads the drift benchmark's sources; one is missing: "
                                f"{err}") from err
    return out


@register_task
class ConversationTask(ReadsGenres, Task):
    name = "conversation"
    description = ("conversation benchmark: 3-turn dialogues whose turns change genre; perplexity of reference "
                   "replies per turn with the cache kept across turns, paired intervals")
    primary = ("ppl_later_turns", False)
    protocol = ("conversation: 3 user turns of different genres ('Continue this text:' + a passage), each reply the "
                "passage's true continuation; one sequence, cache kept across turns; each turn fed dense and traced "
                "(DART re-traces from it, static keeps turn one's mask), replies fed in chunks of <= W tokens with "
                "the monitor live; ppl: geometric mean over dialogues of the per-dialogue reply perplexity")

    def prepare(self) -> None:
        s = self.settings
        genres = selected_genres(s)
        passage, reply = SIZES[s.drift_profile]
        bos = needs_bos_every_window(self.model)
        items = dialogues(self.tokenizer, passage, reply, genres, s.data_dir, bos)
        if s.drift_split != "all":
            items = [d for d in items if d.split == s.drift_split]
        self.items = items[:s.limit_for("conversation")]
        longest = max((sum(len(t) for t, _ in d.parts) for d in self.items), default=0)
        check_context(self.model, longest, "conversations")
        self.records: dict[str, list[dict]] = {}

    def sources(self) -> dict[str, str | None]:
        """The sources of the dialogues scored (a --limit scores fewer)."""
        return {source: None for dialogue in self.items for source in dialogue.sources}

    def evaluate(self, spec: MethodSpec, session) -> list:
        started = time.perf_counter()
        records = []
        for dialogue in progress(self.items, f"conversation {spec.label}"):
            replies = session.score_turns(dialogue.parts, spec.config.window)
            stats = session.stats()[0]
            nll = [float(-r.double().mean()) for r in replies]
            later = [-float(x) for r in replies[1:] for x in r.double()]
            records.append({"name": dialogue.name, "split": dialogue.split, "genres": list(dialogue.genres),
                            "nll_turns": nll, "nll_later": mean(later), "nll_first": nll[0],
                            "tokens": sum(len(t) for t, _ in dialogue.parts),
                            "executed_sparsity": stats.executed_sparsity, "retraces": stats.retrace_count,
                            "overhead_fraction": stats.overhead_fraction})
        self.records[spec.label] = records
        self.details += [{"task": self.name, "method": spec.name, "sparsity": spec.sparsity, **r} for r in records]
        metrics = {f"ppl_turn_{k + 1}": math.exp(mean([r["nll_turns"][k] for r in records])) for k in range(TURNS)}
        metrics["ppl_later_turns"] = math.exp(mean([r["nll_later"] for r in records]))
        metrics["executed_sparsity"] = mean([r["executed_sparsity"] for r in records])
        metrics["retraces_per_dialogue"] = mean([r["retraces"] for r in records])
        metrics["overhead_fraction"] = mean([r["overhead_fraction"] for r in records])
        return [self.result(spec, self.settings.drift_split, metrics, len(records), "turns",
                            {"executed_sparsity": metrics["executed_sparsity"],
                             "retraces_mean": metrics["retraces_per_dialogue"]},
                            time.perf_counter() - started)]

    def comparisons(self) -> list[dict]:
        """Paired over dialogues: the later turns and the first."""
        return paired_perplexities({
            part: {label: [r[key] for r in records] for label, records in self.records.items()}
            for part, key in (("turns 2-3", "nll_later"), ("turn 1", "nll_first"))})
