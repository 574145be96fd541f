"""Run tasks x method specs on one model and write the report."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from dartprune.evaluation import conversation, drift, generation, mc, ppl  # noqa: F401  (registers the tasks)
from dartprune.calibration.file import check_sources_differ, load_calibration
from dartprune.data import data_dir
from dartprune.evaluation.core import Session, load_for_eval, method_specs, progress
from dartprune.provenance import command_line, git_state, versions
from dartprune.evaluation.registry import TASK_REGISTRY, EvalSettings, Result, get_task
from dartprune.methods import METHODS
from dartprune.evaluation.report import markdown, plot_quality, write_details, write_json


def run_evaluation(settings: EvalSettings, model=None, tokenizer=None, command: str | None = None,
                   echo: bool = True) -> tuple[list[Result], Path]:
    """Evaluate; returns the results and the output folder (results.json, results.md, details.jsonl, *.png)."""
    task_classes = [get_task(name) for name in settings.tasks]  # fail fast on unknown names
    specs = method_specs(settings.methods, settings.sparsities, {"seed": settings.seed, **settings.extra},
                         calibration=settings.calibration)     # the seed the results report (random's draw)
    limits = settings.limit.values() if isinstance(settings.limit, dict) else [settings.limit]
    if any(n is not None and n < 1 for n in limits):
        raise ValueError("--limit must be >= 1")
    unknown = sorted(set(settings.limit) - set(TASK_REGISTRY)) if isinstance(settings.limit, dict) else []
    if unknown:
        raise ValueError(f"--limit names unknown task(s) {unknown}; tasks: {', '.join(sorted(TASK_REGISTRY))}")
    outside = sorted(set(settings.limit) - set(settings.tasks)) if isinstance(settings.limit, dict) else []
    if outside:                           # it would be ignored, and a typo in the task list never found
        raise ValueError(f"--limit names task(s) {outside} that --tasks does not include")
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it names the folder the results go to")
    local = data_dir(settings.data_dir)   # a named folder that does not exist fails here, before the model loads
    for cls in task_classes:              # and so does data that cannot be had
        cls.check_data(settings)
    calibrated = [(s, METHODS[s.method].calibration) for s in specs if METHODS[s.method].calibration is not None]
    calibrations = {f: load_calibration(f) for f in sorted({s.config.calibration_file for s, _ in calibrated})}
    for spec, needs in calibrated:          # the method and sparsity before the model loads, the model after
        calibrations[spec.config.calibration_file].check_use(needs, spec.sparsity)
    if model is None:
        model, tokenizer = load_for_eval(settings.model, settings.dtype)
    for file, needs in sorted({(s.config.calibration_file, needs) for s, needs in calibrated}):
        calibrations[file].check(model, needs)     # once per file: it fingerprints the model's weights
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    meta = {"model": settings.model, "dtype": settings.dtype, "seed": settings.seed, "versions": versions(),
            "git": git_state(), "command": command or command_line(),
            "settings": {**settings.to_dict(), "data_dir": None},   # results carry no machine paths
            "data": "local data folder" if local else "Hugging Face Hub (by the usual dataset names)",
            "extra": settings.extra, "threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results: list[Result] = []
    details: list[dict] = []
    plots: list[Path] = []
    comparisons: list[dict] = []
    started = time.perf_counter()
    tasks = []
    for cls in task_classes:   # every task's data first: a missing set fails before any output or compute
        task = cls(settings, model, tokenizer, meta["versions"])
        task.prepare()
        tasks.append(task)
    sources = {name: sha for task in tasks for name, sha in task.sources().items()}
    for calibration in calibrations.values():   # scored on its own text, it would flatter
        check_sources_differ(calibration, sources)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.partial.json").unlink(missing_ok=True)     # an earlier run's, stopped early
    for task in progress(tasks, "tasks", leave=True):
        cls = type(task)
        for spec in progress(specs, f"{cls.name} methods", leave=True):
            with Session(model, tokenizer, spec.config, settings.loop) as session:
                results += task.evaluate(spec, session)
            # partial results survive an interrupted run, beside (not over) an earlier run's complete ones
            write_json(out / "results.partial.json", meta, results)
        details += task.details
        comparisons += [{"task": cls.name, **row} for row in task.comparisons()]
        plots += task.plot_traces(out)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "results.json", meta, results, comparisons)
    (out / "results.partial.json").unlink(missing_ok=True)
    write_details(out / "details.jsonl", details)
    plots += plot_quality(results, out)
    for old in {*out.glob("plot_*.png"), *out.glob("drift_trace_*.png")} - set(plots):   # an earlier run's
        old.unlink()
    table = markdown(meta, results, comparisons)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    if echo:
        print(table)
        print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'details.jsonl'} and "
              f"{len(plots)} plot(s) in {meta['seconds']} s")
    return results, out
