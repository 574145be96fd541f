"""lm-evaluation-harness backend: `--model dartprune` runs any lm-eval task through the DART engine.

Registration happens when this module is imported (lm-eval discovers no models from other packages), so run
lm-eval through dartprune (or `python -m dartprune.evaluation.lm_eval_backend` with the same arguments):

    dartprune lm-eval --model dartprune \
        --model_args pretrained=smollm2-135m,method=dart,sparsity=0.5 --tasks piqa --limit 50

Model args: `pretrained` (alias, local folder or Hub id) and `dtype` load the model; lm-eval's own HFLM options
(batch_size, max_length, add_bos_token, ...) pass through; every other key goes to `DartConfig.from_dict`, which
names any unknown key. `monitored_layers` takes layer indices or relative depths separated by ';' (commas separate model args).

Log-likelihood requests follow the context-only rule (docs/algorithm.md §7): each request is a new sequence whose context (minus
its last token) is prefilled dense and traced, then the last context token and the continuation are fed in
chunks of <= W tokens under the mask, so every continuation token is scored by a pruned forward and the mask
never sees the continuation. Generation requests use the engine as is (`model.generate`, prompt traced).
Rolling log-likelihood (perplexity tasks) gets one-token contexts from lm-eval, so the mask would be traced from
one token: use `dartprune eval --tasks ppl` for perplexity instead.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import torch

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from dartprune.engine import DartConfig, attach
from dartprune.evaluation.core import (
    load_for_eval, needs_bos_every_window, progress, summarise_stats, teacher_forced_logprobs,
)

# HFLM options that still mean something when HFLM is handed a loaded model
HFLM_KEYS = frozenset({"batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "add_bos_token",
                       "prefix_token_id", "softmax_dtype", "think_end_token", "enable_thinking",
                       "chat_template_args"})


def _layers(value: Any) -> tuple[int | float, ...]:
    """Layer indices (int) or relative depths (a number with a decimal point)."""
    if isinstance(value, (int, float)):
        return (value,)
    items = value if isinstance(value, (list, tuple)) else str(value).replace(":", ";").split(";")
    return tuple(v if isinstance(v, (int, float)) else float(v) if "." in v else int(v)
                 for v in items if not isinstance(v, str) or v.strip())


@register_model("dartprune")
class DartLM(HFLM):
    """HFLM with the DART engine attached; log-likelihood scored under the context-only rule."""

    def __init__(self, pretrained: str = "smollm2-135m", dtype: str = "float32", device: str | None = None,
                 **kwargs: Any) -> None:
        hf = {k: kwargs.pop(k) for k in list(kwargs) if k in HFLM_KEYS}
        if "monitored_layers" in kwargs:
            kwargs["monitored_layers"] = _layers(kwargs["monitored_layers"])
        config = DartConfig.from_dict(kwargs)  # ConfigError naming unknown keys, before the model loads
        model, tokenizer = load_for_eval(str(pretrained), str(dtype))
        if device and device != "cpu":
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                logging.getLogger(__name__).warning("device %r: CUDA is not available, running on the CPU", device)
            else:
                model = model.to(device)
        if needs_bos_every_window(model):
            hf.setdefault("add_bos_token", True)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **hf)
        self.dart_config = config
        self.handle = attach(self.model, config)
        # SequenceStats of every scored request, for `stats_summary`; without their per-window drift records, which
        # would grow with every token of a long run
        self.dart_stats: list = []

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """lm-eval's hook for scoring tokenised requests (the abstract method of its `TemplateLM` that every model
        implements, HFLM included), replaced to score each request under the context-only rule."""
        results = []
        for (context, continuation), ctx, cont in progress(requests, "dartprune loglikelihood",
                                                           disable=disable_tqdm or None):
            ids = list(ctx) + list(cont)
            keep = self.max_length + 1  # as HFLM: drop tokens from the left when too long
            cut = max(0, len(ids) - keep)
            ids, traced = ids[cut:], max(0, len(ctx) - cut - 1)
            self.handle.reset()
            scored = teacher_forced_logprobs(self.model, ids, traced, self.dart_config.window)
            self.dart_stats += [dataclasses.replace(row, windows=[]) for row in self.handle.stats()]
            answer = (scored.total, scored.all_greedy)
            results.append(answer)
            if context is not None:
                self.cache_hook.add_partial("loglikelihood", (context, continuation), answer)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.handle.reset()
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def stats_summary(self) -> dict[str, float]:
        """Mean engine statistics over the log-likelihood requests scored so far (executed sparsity, re-traces)."""
        return summarise_stats(self.dart_stats)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with `--model dartprune` registered."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
