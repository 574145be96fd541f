"""Write an evaluation: results.json, details.jsonl, results.md (also printed) and PNG plots."""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dartprune.evaluation.core import method_label  # noqa: E402
from dartprune.evaluation.registry import Result, get_task  # noqa: E402


def _fmt(value) -> str:
    if value is None:                       # a figure that could not be measured, as result files store it
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:.4g}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def _label(r: Result) -> str:
    return method_label(r.method, r.sparsity)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _strict(value: Any) -> Any:
    """`value` with every NaN or infinity as None: the JSON standard has no such numbers (strict readers refuse
    them), and a figure that could not be measured (no switch detected: no median delay) is absent."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, meta: dict, results: list[Result], comparisons: list[dict] | None = None) -> None:
    data = {"meta": meta, "results": [r.to_dict() for r in results], "comparisons": comparisons or []}
    path.write_text(json.dumps(_strict(data), indent=1, default=str, allow_nan=False) + "\n")


def write_details(path: Path, details: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in details:
            f.write(json.dumps(_strict(row), default=str, allow_nan=False) + "\n")


def _summary_columns(results: list[Result]) -> list[tuple[str, str, str]]:
    """(task, subtask or '*', metric) columns for the summary table, in task order."""
    columns = []
    for task in dict.fromkeys(r.task for r in results):
        cls = get_task(task)
        subtask = cls.summary_subtask(list(dict.fromkeys(r.subtask for r in results if r.task == task)))
        columns += [(task, subtask, metric) for metric in cls.summary or (cls.primary[0],)]
    return columns


def _column_title(task: str, subtask: str, metric: str) -> str:
    """'drift ppl_b', 'mc acc_norm', 'ppl' (not 'ppl ppl')."""
    where = task + ("" if subtask in ("*", "mean") else ":" + subtask)
    return where if metric == task else f"{where} {metric}"


def _value(results: list[Result], label: str, task: str, subtask: str, metric: str) -> float:
    values = [r.metrics[metric] for r in results if r.task == task and _label(r) == label
              and (subtask == "*" or r.subtask == subtask) and metric in r.metrics]
    if metric.startswith("ppl") and values:  # geometric mean over subtasks
        return math.exp(sum(math.log(v) for v in values) / len(values))
    return sum(values) / len(values) if values else float("nan")


def _interval(value) -> str:
    if not value:
        return "-"
    estimate, low, high = value
    return f"{_fmt(estimate)} [{_fmt(low)}, {_fmt(high)}]"


def interval_text(value: tuple[float, float, float]) -> str:
    """An estimate and its interval, 'e [lo, hi]' to three decimals (the benchmark scripts' tables)."""
    estimate, low, high = value
    return f"{estimate:.3f} [{low:.3f}, {high:.3f}]"


def comparisons_markdown(comparisons: list[dict]) -> list[str]:
    """The paired comparisons as tables, 95% intervals: perplexity ratios and gap recovered (drift,
    conversation); ROUGE-L ratios and differences (summaries)."""
    ppl = [c for c in comparisons if c.get("measure", "ppl") == "ppl"]
    rouge = [c for c in comparisons if c.get("measure") == "rougeL"]
    if not comparisons:
        return []
    lines = ["## Paired comparisons", "",
             "Over the same items, with 95% bootstrap intervals (2,000 resamples of the items)."]
    if ppl:
        lines += ["", "ppl ratio < 1: lower perplexity than the other method. Gap recovered: the share of static's "
                  "log-perplexity gap to dense that the method closes (1 = dense, 0 = static, < 0 worse than "
                  "static).", "",
                  "| task | method | part | items | ppl ratio vs static | gap recovered | ppl ratio vs dense |",
                  "|---|---|---|---|---|---|---|"]
        for c in ppl:
            lines.append(f"| {c['task']} | {c['method']} | {c['part']} | {c['items']} | "
                         f"{_interval(c.get('ppl_ratio_vs_static'))} | {_interval(c.get('gap_recovered'))} | "
                         f"{_interval(c.get('ppl_ratio_vs_dense'))} |")
    if rouge:
        lines += ["", "Mean ROUGE-L against the reference summaries: ratio > 1 and difference > 0 mean better "
                  "than the other method.", "",
                  "| task | method | items | ROUGE-L ratio vs static | ROUGE-L difference vs static | "
                  "ROUGE-L ratio vs dense |", "|---|---|---|---|---|---|"]
        for c in rouge:
            lines.append(f"| {c['task']} | {c['method']} | {c['items']} | {_interval(c.get('ratio_vs_static'))} | "
                         f"{_interval(c.get('difference_vs_static'))} | {_interval(c.get('ratio_vs_dense'))} |")
    return lines + [""]


def markdown(meta: dict, results: list[Result], comparisons: list[dict] | None = None) -> str:
    lines = [f"# dartprune eval: {meta['model']} ({meta['dtype']})", "",
             f"Command: `{meta.get('command', '')}`  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "  ",
             f"Seed {meta['seed']}; DartConfig overrides: {meta.get('extra') or 'none'}", ""]
    labels = list(dict.fromkeys(_label(r) for r in results))
    columns = _summary_columns(results)
    if columns:
        notes = [note for note in (get_task(task).summary_note for task in dict.fromkeys(r.task for r in results))
                 if note]
        lines += ["## Summary", ""] + ([" ".join(notes), ""] if notes else []) + [
                  "| method | " + " | ".join(_column_title(*c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(_fmt(_value(results, label, *c)) for c in columns) + " |")
        lines.append("")
    for task in dict.fromkeys(r.task for r in results):
        rows = [r for r in results if r.task == task]
        # the engine's executed sparsity has its own column
        metrics = list(dict.fromkeys(k for r in rows for k in r.metrics if k != "executed_sparsity"))
        items = {r.subtask: r.items for r in rows}
        prefix = {r.subtask: r.prefix_length for r in rows}
        lines += [f"## {task}", "", f"Protocol: {rows[0].protocol}", "",
                  "Items: " + ", ".join(f"{s} {n} (prefix {prefix[s]})" for s, n in items.items()), "",
                  "| subtask | method | " + " | ".join(metrics) + " | executed sparsity | re-traces/seq | s |",
                  "|---" * (len(metrics) + 5) + "|"]
        for r in rows:
            lines.append(f"| {r.subtask} | {_label(r)} | " + " | ".join(_fmt(r.metrics.get(m, float('nan')))
                                                                       for m in metrics)
                         + f" | {_fmt(r.engine.get('executed_sparsity', float('nan')))}"
                         + f" | {_fmt(r.engine.get('retraces_mean', float('nan')))} | {r.seconds:.1f} |")
        lines.append("")
    lines += comparisons_markdown(comparisons or [])
    return "\n".join(lines)


def plot_quality(results: list[Result], out: Path) -> list[Path]:
    """One figure per task: its primary metric vs sparsity, a line per method, dense as a dashed line."""
    paths = []
    for task in dict.fromkeys(r.task for r in results):
        metric, _ = get_task(task).primary
        rows = [r for r in results if r.task == task and metric in r.metrics]
        subtasks = list(dict.fromkeys(r.subtask for r in rows))
        if not subtasks:
            continue
        cols = min(3, len(subtasks))
        nrows = math.ceil(len(subtasks) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
        for ax, subtask in zip(axes.flat, subtasks):
            by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for r in rows:
                if r.subtask == subtask:
                    by_method[r.method].append((r.sparsity, r.metrics[metric]))
            for n, (method, points) in enumerate(by_method.items()):
                points.sort()
                if method == "dense":
                    ax.axhline(points[0][1], color="black", ls="--", lw=1, label="dense")
                else:  # distinct markers and sizes, so methods with equal values stay visible
                    ax.plot(*zip(*points), marker="osD^vP*X"[n % 8], ms=9 - n % 5, alpha=0.85, label=method)
            if metric.startswith("ppl"):
                ax.set_yscale("log")
            ax.set_title(subtask, fontsize=9)
            ax.set_xlabel("FFN sparsity")
            ax.set_ylabel(metric)
        for ax in list(axes.flat)[len(subtasks):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{task}: {metric} vs sparsity ({rows[0].model})")
        fig.tight_layout()
        path = out / f"plot_{task}_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_drift_traces(traces: dict, switches: dict[str, int], out: Path) -> list[Path]:
    """The drift monitor's window cosines for every method that follows drift, per pair, switch marked."""
    from dartprune.plots import plot_drift_trace
    paths = []
    for (pair, method, sparsity), stats in traces.items():
        if not stats.windows:
            continue
        path = out / f"drift_trace_{_safe(pair)}_{method}_{sparsity:g}.png"
        title = (f"{pair}: {method} @ {sparsity:g}, {stats.retrace_count} re-traces "
                 f"(switch at {switches[pair]})")
        paths.append(plot_drift_trace(stats, path, title=title, switch_at=switches[pair]))
    return paths
