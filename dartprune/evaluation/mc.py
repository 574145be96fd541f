"""`mc`: zero-shot multiple choice by log-likelihood, with the context-only rule (docs/algorithm.md §7).

For each choice the context is prefilled as a new sequence (dense, traced: the mask comes from the context
only), then the continuation is scored under that mask. The context prefill is re-run per choice, so no choice
can see another's state; the mask after the context is therefore the same for every choice (a test asserts it).
"""
from __future__ import annotations

import time

from dartprune.evaluation.core import (
    MethodSpec, encode_pair, needs_bos_every_window, progress, summarise_stats,
)
from dartprune.data import MCItem, load_mc
from dartprune.evaluation.registry import Task, register_task

PROTOCOL_MC = (
    "mc: lm-eval zero-shot cloze (context, ' ' + choice), tokenised as lm-eval's _encode_pair; per choice, "
    "prefill the context minus its last token as a new sequence (dense, traced: mask from the context only), "
    "then feed the last context token and the continuation in chunks <= W under the mask, so every continuation "
    "token is predicted by a pruned forward; acc = argmax sum log p; acc_norm = argmax sum log p / UTF-8 byte "
    "length of the choice text (lm-eval's acc_norm length, equal to its character length for ASCII)")


def score_item(session, tokenizer, item: MCItem, chunk: int, bos: bool = False, on_traced=None,
               after=None) -> list[float]:
    """Summed continuation log-likelihood of every choice of `item`, scored by `session`.

    on_traced(choice) runs right after the context prefill of a choice; after(choice) once it is scored."""
    scores = []
    for choice, (context, continuation) in enumerate(item.pairs):
        ctx, cont = encode_pair(tokenizer, context, continuation, bos)
        hook = (lambda c=choice: on_traced(c)) if on_traced is not None else None
        scores.append(session.score(ctx + cont, len(ctx) - 1, chunk, on_traced=hook).total)
        if after is not None:
            after(choice)
    return scores


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


@register_task
class MultipleChoice(Task):
    name = "mc"
    description = "zero-shot multiple choice (PIQA, ARC, BoolQ, COPA, OpenBookQA, WinoGrande, SIQA, CSQA)"
    primary = ("acc_norm", True)
    summary = ("acc_norm", "acc")
    summary_note = "mc: unweighted mean over the sets."

    @classmethod
    def summary_subtask(cls, subtasks: list[str]) -> str:
        return "mean" if "mean" in subtasks else subtasks[0]
    protocol = PROTOCOL_MC

    @classmethod
    def check_data(cls, settings) -> None:
        for name in settings.mc_sets:
            load_mc(name, 1, settings.data_dir)

    def prepare(self) -> None:
        self.sets = {name: load_mc(name, self.settings.limit_for("mc"), self.settings.data_dir)
                     for name in self.settings.mc_sets}
        self.bos = needs_bos_every_window(self.model)

    def evaluate(self, spec: MethodSpec, session) -> list:
        results, accs, norms = [], [], []
        for name, items in self.sets.items():
            started = time.perf_counter()
            correct = correct_norm = 0
            stats, prefix_tokens = [], []
            for item in progress(items, f"mc {name} {spec.label}"):
                lls = score_item(session, self.tokenizer, item, spec.config.window, self.bos,
                                 after=lambda c: stats.extend(session.stats()))
                norm = [ll / max(1, len(choice.encode("utf-8"))) for ll, choice in zip(lls, item.choices)]
                pred, pred_norm = _argmax(lls), _argmax(norm)
                correct += pred == item.label
                correct_norm += pred_norm == item.label
                prefix_tokens.append(stats[-1].prompt_tokens if stats else 0)
                self.details.append({"task": self.name, "set": name, "index": item.index, "method": spec.name,
                                     "sparsity": spec.sparsity, "lls": lls, "label": item.label, "pred": pred,
                                     "pred_norm": pred_norm})
            n = len(items)
            acc, acc_norm = correct / n if n else float("nan"), correct_norm / n if n else float("nan")
            accs.append(acc)
            norms.append(acc_norm)
            results.append(self.result(spec, name, {"acc": acc, "acc_norm": acc_norm}, n,
                                       round(sum(prefix_tokens) / max(1, len(prefix_tokens)), 1),
                                       summarise_stats(stats), time.perf_counter() - started))
        if len(self.sets) > 1:
            total = sum(len(items) for items in self.sets.values())
            results.append(self.result(spec, "mean", {"acc": sum(accs) / len(accs),
                                                      "acc_norm": sum(norms) / len(norms)}, total,
                                       "see sets", {}, sum(r.seconds for r in results),
                                       note="unweighted mean over the sets above"))
        return results
