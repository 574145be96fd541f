"""Evaluation of dense and pruned models under the rules of docs/algorithm.md §7: perplexity, drift across a text switch,
multiple choice, summarisation, two-topic generation and conversations; plus an lm-evaluation-harness backend
(lm_eval_backend)."""
from dartprune.evaluation.core import MethodSpec, method_specs, teacher_forced_logprobs
from dartprune.evaluation.registry import TASK_REGISTRY, EvalSettings, Result, Task, get_task, register_task
from dartprune.evaluation.runner import run_evaluation

__all__ = ["EvalSettings", "MethodSpec", "Result", "TASK_REGISTRY", "Task", "get_task", "method_specs",
           "register_task", "run_evaluation", "teacher_forced_logprobs"]
