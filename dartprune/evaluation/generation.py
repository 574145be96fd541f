"""`xsum`, `cnn_dailymail` and `topics`: greedy generation, scored by ROUGE against references and against the dense output."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dartprune.decode.chat import has_chat_template, render_chat
from dartprune.evaluation.core import MethodSpec, needs_bos_every_window, progress, summarise_stats
from dartprune.models import check_context
from dartprune.data import SUMMARY_SETS, TOPIC_PROMPTS, load_summaries
from dartprune.evaluation.intervals import bootstrap
from dartprune.evaluation.registry import Task, register_task

_SCORER = None


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 (rouge-score, Porter stemmer), 0..1."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = _SCORER.score(reference, prediction)
    return {k: v.fmeasure for k, v in scores.items()}


def rouge_vs_dense(text: str, dense_text: str) -> float:
    """ROUGE-L F1 of an output against the dense model's output for the same prompt: 1 for the same output, two
    empty ones included (which ROUGE scores 0)."""
    return 1.0 if text == dense_text else rouge(text, dense_text)["rougeL"]


def repetition(text: str, n: int = 4) -> float:
    """Share of the text's word n-grams that repeat an earlier one: 0 for text that never repeats itself, near 1
    for a loop ("by the invention by the invention ...")."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass(frozen=True)
class _Prompt:
    """One prompt of a generation task: ids [1, tokens], how many tokens to generate, the reference text (None:
    scored against dense only) and the strings that end the output."""

    ids: torch.Tensor
    max_new_tokens: int
    reference: str | None
    stop: tuple[str, ...] | None


class _GenerationTask(Task):
    """Dense runs first; its outputs become the reference for ROUGE-L vs dense. Subclasses fill `self.items`
    in `prepare` with one `_Prompt` per prompt."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dense_outputs: list[str] | None = None
        self.scores: dict[str, list[dict[str, float]]] = {}      # per method label, per item

    def evaluate(self, spec: MethodSpec, session) -> list:
        started = time.perf_counter()
        outputs, stats, scores, new_tokens = [], [], [], 0
        for i, item in enumerate(progress(self.items, f"{self.name} {spec.label}")):
            text, count = session.generate(item.ids, item.max_new_tokens, list(item.stop) if item.stop else None)
            reference = item.reference
            new_tokens += count
            stats += session.stats()
            outputs.append(text)
            row: dict[str, float] = {"repetition": repetition(text)}
            if reference is not None:
                row.update(rouge(text, reference))
            if self.dense_outputs is not None:
                row["rougeL_vs_dense"] = rouge_vs_dense(text, self.dense_outputs[i])
            elif spec.method == "dense":
                row["rougeL_vs_dense"] = 1.0
            scores.append(row)
            self.details.append({"task": self.name, "index": i, "method": spec.name, "sparsity": spec.sparsity,
                                 "output": text, "reference": reference, "scores": row,
                                 "retrace_positions": stats[-1].retrace_positions if stats else []})
        if spec.method == "dense":
            self.dense_outputs = outputs
        self.scores[spec.label] = scores
        metrics = {k: _mean([r[k] for r in scores if k in r]) for k in (scores[0] if scores else {})}
        metrics["new_tokens_mean"] = new_tokens / max(1, len(outputs))
        seconds = time.perf_counter() - started
        return [self.result(spec, self.subtask, metrics, len(outputs),
                            round(_mean([float(item.ids.shape[1]) for item in self.items]), 1),
                            summarise_stats(stats), seconds, tokens_per_second=new_tokens / seconds if seconds else 0,
                            **self.extra_fields)]


class _Summaries(_GenerationTask):
    """A summarisation set: the prompt fed verbatim, greedy up to the item's max_tokens, cut at its stop strings."""

    primary = ("rougeL", True)
    summary = ("rougeL", "rougeL_vs_dense")

    @classmethod
    def check_data(cls, settings) -> None:
        load_summaries(cls.name, 1, settings.data_dir, settings.summary_files.get(cls.name))

    def prepare(self) -> None:
        bos = needs_bos_every_window(self.model)
        self.items = []
        for doc in load_summaries(self.name, self.settings.limit_for(self.name), self.settings.data_dir,
                                  self.settings.summary_files.get(self.name)):
            ids = self.tokenizer(doc["article"], return_tensors="pt").input_ids
            if bos and ids[0, 0] != self.tokenizer.bos_token_id:
                ids = torch.cat([torch.tensor([[self.tokenizer.bos_token_id]]), ids], dim=1)
            check_context(self.model, ids.shape[1] + doc["max_tokens"],
                          f"a {self.name} prompt of {ids.shape[1]} tokens and {doc['max_tokens']} new tokens")
            self.items.append(_Prompt(ids, doc["max_tokens"], doc["summary_gt"], tuple(doc["stop"])))
        self.extra_fields = {"data": SUMMARY_SETS[self.name].local,
                             "stop": sorted({text for item in self.items for text in item.stop})}

    def comparisons(self) -> list[dict]:
        """Every pruned method against static at the same sparsity and against dense, paired over articles:
        the ratio and the difference of mean ROUGE-L (the paper's "times the ROUGE-L of a static mask")."""
        out = []
        dense = self.scores.get("dense")
        for label, scores in self.scores.items():
            method, _, sparsity = label.partition("@")
            if method == "dense":
                continue
            mine = [r["rougeL"] for r in scores]
            row = {"method": label, "part": "summaries", "items": len(mine), "measure": "rougeL"}
            static = self.scores.get(f"static@{sparsity}")
            if static is not None and method != "static":
                theirs = [r["rougeL"] for r in static]
                row["ratio_vs_static"] = bootstrap([mine, theirs], _ratio_of_means)
                row["difference_vs_static"] = bootstrap([mine, theirs], _difference_of_means)
            if dense is not None:
                row["ratio_vs_dense"] = bootstrap([mine, [r["rougeL"] for r in dense]], _ratio_of_means)
            out.append(row)
        return out


def _ratio_of_means(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.mean() / b.mean()) if float(b.mean()) > 0 else float("nan")


def _difference_of_means(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.mean() - b.mean())


@register_task
class XSum(_Summaries):
    name = "xsum"
    description = "XSum 1-shot summaries (HELM prompts), greedy, ROUGE-1/2/L vs reference and ROUGE-L vs dense"
    protocol = ("xsum: `article` fed verbatim (1-shot HELM prompt; prompt = traced prefix), greedy decoding of up "
                "to the item's max_tokens (64), cut at the item's stop strings ('###' in the HELM files); ROUGE F1 "
                "(rouge-score, stemmer) vs summary_gt and ROUGE-L vs the dense model's output for the same item")
    subtask = "xsum_1shot"


@register_task
class CNNDailyMail(_Summaries):
    name = "cnn_dailymail"
    description = "CNN/DailyMail 0-shot 3-sentence summaries (HELM prompts), greedy up to 128 tokens, ROUGE"
    protocol = ("cnn_dailymail: `article` fed verbatim (0-shot HELM prompt asking for 3 sentences; prompt = traced "
                "prefix), greedy decoding of up to the item's max_tokens (128), cut at the item's stop strings ('###' "
                "in the HELM files); ROUGE F1 (rouge-score, stemmer) vs summary_gt and ROUGE-L vs the dense model's "
                "output for the same item")
    subtask = "cnn_dailymail_0shot"


@register_task
class Topics(_GenerationTask):
    name = "topics"
    description = "two-topic prompts, greedy; ROUGE-L vs the dense output and re-trace counts"
    primary = ("rougeL_vs_dense", True)
    protocol = ("topics: project-written two-topic prompts (dartprune.data.TOPIC_PROMPTS), in the "
                "tokenizer's chat template when it has one (--chat auto), greedy decoding of --topic-tokens "
                "tokens; ROUGE-L F1 vs the dense model's output")
    subtask = "two_topic_prompts"

    def prepare(self) -> None:
        prompts = TOPIC_PROMPTS[:self.settings.limit_for("topics")]
        has_template = has_chat_template(self.tokenizer)
        if self.settings.chat == "yes" and not has_template:
            raise ValueError("--chat yes: this tokenizer has no chat template")
        self.chat = self.settings.chat == "yes" or (self.settings.chat == "auto" and has_template)
        bos = needs_bos_every_window(self.model)
        self.items = []
        for prompt in prompts:
            if self.chat:
                ids = torch.tensor([render_chat(self.tokenizer, [{"role": "user", "content": prompt}])])
            else:
                ids = self.tokenizer(prompt, return_tensors="pt").input_ids
                if bos and ids[0, 0] != self.tokenizer.bos_token_id:
                    ids = torch.cat([torch.tensor([[self.tokenizer.bos_token_id]]), ids], dim=1)
            self.items.append(_Prompt(ids, self.settings.topic_tokens, None, None))
        self.extra_fields = {"prompt_format": "chat" if self.chat else "plain", "prompts": prompts}
