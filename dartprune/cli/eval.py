"""`dartprune eval`: perplexity, drift, multi-turn conversations, multiple choice, summarisation (XSum,
CNN/DailyMail) and two-topic generation for dense and pruned methods at several sparsities; writes results.json,
results.md (printed), details.jsonl and PNG plots."""
from __future__ import annotations

import argparse
from pathlib import Path
from collections.abc import Callable

from dartprune.engine.config import parse_settings


def _csv(kind):
    def parse(text: str) -> list:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(v) for v in values]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    return parse


def split_methods(text: str) -> list[str]:
    """Comma-separated methods; commas inside a variant's brackets (`dart[monitored_layers=(0, -1)]`) stay."""
    methods, depth, current, balanced = [], 0, "", True
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        balanced = balanced and depth >= 0
        if char == "," and depth == 0:
            methods.append(current.strip())
            current = ""
        else:
            current += char
    methods = [m for m in (*methods, current.strip()) if m]
    if not methods or depth or not balanced:
        raise argparse.ArgumentTypeError(f"expected comma-separated methods with balanced brackets, got {text!r}")
    return methods


def _limit(text: str) -> int | dict[str, int]:
    """N, or TASK=N,... (tasks checked against the registry once they are all registered, in `run`)."""
    def count(value: str) -> int:
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--limit takes N or TASK=N,..., got {text!r}") from None

    if "=" not in text:
        return count(text)
    limits = {}
    for item in _csv(str)(text):
        task, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--limit item {item!r} must look like TASK=N")
        limits[task.strip()] = count(value)
    return limits


def _sources(text: str) -> dict[str, list[str]]:
    genres = {}
    for item in text.split(";"):
        genre, sep, sources = item.partition("=")
        if not sep or not genre.strip() or not sources.strip():
            raise argparse.ArgumentTypeError(f"--drift-sources item {item!r} must look like GENRE=SOURCE[+SOURCE]")
        genres[genre.strip()] = [src.strip() for src in sources.split("+") if src.strip()]
    if len(genres) < 2:
        raise argparse.ArgumentTypeError("--drift-sources needs at least two genres (a switch goes between two)")
    return genres


def _task_names() -> list[str]:
    from dartprune.evaluation import runner  # noqa: F401  (registers the tasks)
    from dartprune.evaluation.registry import TASK_REGISTRY
    return list(TASK_REGISTRY)


def register(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    from dartprune.evaluation.registry import EvalSettings
    d = EvalSettings()
    p = add_parser("eval", help="evaluate dense and pruned methods (ppl, drift, conversation, mc, xsum, "
                                "cnn_dailymail, topics)",
                              description=__doc__)
    p.add_argument("--model", default=d.model, help="alias, local folder or Hugging Face id")
    p.add_argument("--methods", type=split_methods, default=d.methods,
                   help="comma-separated methods (dense always runs once, as the reference); a method may carry its own "
                        "settings, e.g. dart,dart[detector=paper;window=5] compares two DART configurations in one run")
    p.add_argument("--sparsity", type=_csv(float), default=d.sparsities, help="comma-separated FFN sparsities")
    p.add_argument("--tasks", type=_csv(str), default=d.tasks, help="comma-separated: " + ",".join(sorted(_task_names())))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=_limit, help="items per task: N for every task, or TASK=N,... (mc: per set; "
                                                "ppl: windows; drift: switch sequences (and half as many controls); conversation: dialogues; "
                                                "xsum, cnn_dailymail: "
                                                "articles; topics: prompts)")
    p.add_argument("--data-dir", help="local evaluation data folder (default: $DARTPRUNE_DATA, else the Hugging "
                                      "Face Hub by the usual dataset names; layout in docs/data.md)")
    p.add_argument("--text", default=d.text, help="ppl: a text file, gutenberg:NAME, wikitext2 or python:MODULE "
                                                  f"(default {d.text})")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--prefix", type=int, default=d.prefix, help="ppl/drift: traced prefix tokens per window")
    p.add_argument("--ppl-window", type=int, default=d.ppl_window, help="ppl: tokens per window, prefix included")
    p.add_argument("--ppl-windows", type=int, default=d.ppl_windows, help="ppl: windows (without --limit)")
    p.add_argument("--drift-segment", type=int, default=d.drift_segment,
                   help="drift: tokens of A's continuation and of B (default: 256, or 24 with --drift-profile quick)")
    p.add_argument("--drift-profile", default=d.drift_profile, choices=["full", "quick"],
                   help="drift, conversation: full (7 genres, 42 switch sequences and 21 controls) or quick "
                        "(3 genres, short)")
    p.add_argument("--drift-sources", type=_sources, default=None, metavar="GENRE=SOURCE[+SOURCE];...",
                   help="drift, conversation: your own genres and text sources (docs/data.md) instead of the built-in ones, e.g. "
                        "'code=python:argparse+python:csv;wiki=wikitext2'")
    p.add_argument("--drift-split", default=d.drift_split, choices=["all", "tune", "test"],
                   help="drift, conversation: every sequence, or the half to choose settings on (tune) or to "
                        "report on (test)")
    p.add_argument("--mc-sets", type=_csv(str), default=d.mc_sets, help="mc: comma-separated sets")
    p.add_argument("--summary-file", action="append", default=[], metavar="TASK=FILE",
                   help="xsum / cnn_dailymail: another jsonl in the local layout (docs/data.md), e.g. xsum=my.jsonl")
    p.add_argument("--topic-tokens", type=int, default=d.topic_tokens, help="topics: tokens generated per prompt")
    p.add_argument("--chat", default=d.chat, choices=["auto", "yes", "no"], help="topics: use the chat template")
    p.add_argument("--loop", default=d.loop, choices=["auto", "native", "hf"],
                   help="decode loop: dartprune's native loop (Llama and Gemma families; auto picks it where it "
                        "runs) or Hugging Face with the engine attached")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often faster "
                                              "for batch-1 decoding on a busy 2-core machine)")
    p.add_argument("--calibration-file", action="append", default=[], metavar="[METHOD=]FILE",
                   help="for wanda-static and threshold (see `dartprune calibrate`): METHOD=FILE, repeatable; "
                        "a bare FILE applies to every calibrated method")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other DartConfig field for every pruned method, e.g. --set window=8")
    p.set_defaults(run=run)


# options that only some tasks read: (option, its EvalSettings field, the tasks that read it)
TASK_OPTIONS = (("--text", "text", ("ppl",)), ("--ppl-window", "ppl_window", ("ppl",)),
                ("--ppl-windows", "ppl_windows", ("ppl",)), ("--prefix", "prefix", ("ppl", "drift")),
                ("--drift-segment", "drift_segment", ("drift",)),
                ("--drift-profile", "drift_profile", ("drift", "conversation")),
                ("--drift-sources", "drift_sources", ("drift", "conversation")),
                ("--drift-split", "drift_split", ("drift", "conversation")), ("--mc-sets", "mc_sets", ("mc",)),
                ("--topic-tokens", "topic_tokens", ("topics",)), ("--chat", "chat", ("topics",)))


def check_task_options(args: argparse.Namespace) -> None:
    """An option set away from its default for tasks that --tasks leaves out would be silently ignored (and a
    wrong value in it never found): refuse it."""
    from dartprune.evaluation.registry import EvalSettings, get_task
    for name in args.tasks:               # a misspelt task first: it is why an option seems misplaced
        get_task(name)
    defaults = EvalSettings()
    for flag, field, tasks in TASK_OPTIONS:
        if getattr(args, field) != getattr(defaults, field) and not set(tasks) & set(args.tasks):
            raise ValueError(f"{flag} is for the {' and '.join(tasks)} task{'s' if len(tasks) > 1 else ''}, "
                             "which --tasks does not include")
    for item in args.summary_file:
        task = item.partition("=")[0]
        if task in ("xsum", "cnn_dailymail") and task not in args.tasks:
            raise ValueError(f"--summary-file {item}: --tasks does not include {task}")


def run(args: argparse.Namespace) -> int:
    from dartprune.evaluation.core import parse_method
    from dartprune.evaluation.registry import EvalSettings
    from dartprune.methods import METHODS
    from dartprune.evaluation.runner import run_evaluation
    check_task_options(args)
    extra = parse_settings(args.set)
    calibrated = sorted({parse_method(m)[0] for m in args.methods} & {m for m, spec in METHODS.items()
                                                                      if spec.calibration is not None})
    calibration: dict[str, str] = {}
    for item in args.calibration_file:
        method, sep, path = item.partition("=")
        keyed = bool(sep) and method in METHODS       # else a bare FILE, which may itself hold a '='
        if sep and not keyed and not Path(item).exists():
            raise ValueError(f"--calibration-file {item}: {method!r} is not a method and {item} is not a file; use "
                             f"METHOD=FILE with METHOD one of {', '.join(calibrated) or 'wanda-static, threshold'}, "
                             "or a bare FILE")
        if not calibrated:
            raise ValueError(f"--calibration-file {item}: none of --methods needs a calibration file "
                             f"(wanda-static and threshold do)")
        if keyed and method not in calibrated:
            raise ValueError(f"--calibration-file {item}: {method!r} is not a calibrated method among --methods; "
                             f"use METHOD=FILE with METHOD one of {', '.join(calibrated)}, or a bare FILE")
        calibration.update({method: path} if keyed else dict.fromkeys(calibrated, item))
    for name, value in (("--prefix", args.prefix), ("--ppl-window", args.ppl_window),
                        ("--ppl-windows", args.ppl_windows), ("--drift-segment", 1 if args.drift_segment is None else args.drift_segment),
                        ("--topic-tokens", args.topic_tokens),
                        ("--threads", args.threads if args.threads is not None else 1)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1")
    summary_files = {}
    for item in args.summary_file:
        task, sep, path = item.partition("=")
        if not sep or task not in ("xsum", "cnn_dailymail"):
            raise ValueError(f"--summary-file expects xsum=FILE or cnn_dailymail=FILE, got {item!r}")
        summary_files[task] = path
    settings = EvalSettings(model=args.model, data_dir=args.data_dir, dtype=args.dtype, methods=args.methods, sparsities=args.sparsity,
                            tasks=args.tasks, out=args.out, limit=args.limit, seed=args.seed, extra=extra,
                            text=args.text, prefix=args.prefix, ppl_window=args.ppl_window,
                            ppl_windows=args.ppl_windows, drift_segment=args.drift_segment,
                            drift_profile=args.drift_profile, drift_split=args.drift_split,
                            drift_sources=args.drift_sources, mc_sets=args.mc_sets, summary_files=summary_files,
                            topic_tokens=args.topic_tokens, chat=args.chat, threads=args.threads, loop=args.loop,
                            calibration=calibration)
    run_evaluation(settings)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dartprune.cli.eval ARGS` = `dartprune eval ARGS`."""
    import sys
    parser = argparse.ArgumentParser(prog="dartprune")
    register(parser.add_subparsers(dest="command", required=True).add_parser)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
