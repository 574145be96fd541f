"""`dartprune bench`: decode speed of dense and pruned runs in one process, with the byte ceiling and the
share of it achieved, DART's state and FLOP overhead, peak memory and re-trace cost."""
from __future__ import annotations

import argparse
from collections.abc import Callable
import re
import sys
from pathlib import Path

from dartprune.engine.config import DartConfig, check_no_method_or_sparsity, parse_settings
from dartprune.methods import METHODS
from dartprune.models import DEFAULT_MODEL


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _names(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def register(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    p = add_parser(
        "bench", help="measure decode speed, dense vs pruned, against the byte ceiling",
        description="Generate the same prompt greedily with every method and sparsity (dense = no handle), "
                    "interleaving repeats, and report time to first token, time per output token, tokens/s, "
                    "speedup over dense, the byte ceiling and the share of it achieved, peak memory, "
                    "re-traces and DART's overhead. Writes JSON and a markdown table per dtype.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or Hugging Face id")
    p.add_argument("--methods", type=_names, default=["dense", "dart", "static", "griffin"],
                   help="comma-separated; must include dense (the baseline)")
    p.add_argument("--sparsity", type=_floats, default=[0.0, 0.5, 0.7], help="comma-separated, each in [0, 1)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (taken from --text)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (exactly)")
    p.add_argument("--dtype", type=_names, default=["float32"], help="comma-separated: float32,bfloat16,float16")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median, min, max)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration first")
    p.add_argument("--ttft-pairs", type=int, default=10,
                   help="native loop: prompt forwards of dense and each pruned method, interleaved, for the time to "
                        "first token (0: only the one pair of each run)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: all cores); recorded in the results")
    p.add_argument("--loops", type=_names, default=["native"],
                   help="comma-separated: native (dartprune's loop, paired with a dense native loop; Llama and "
                        "Gemma families) and/or hf (Hugging Face generate with the engine attached)")
    p.add_argument("--calibration-file", help="for a calibrated method in --methods, wanda-static or threshold "
                                              "(see `dartprune calibrate`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other DartConfig field for every pruned method, e.g. --set retrace_spread=4")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--text", default="wikitext2",
                   help="prompt source: a file, gutenberg:NAME, wikitext2 or python:MODULE (default wikitext2)")
    p.add_argument("--data-dir", help="local evaluation data folder (default: $DARTPRUNE_DATA, else the Hub; "
                                      "see docs/data.md)")
    p.add_argument("--offset", type=int, default=5000, help="character offset of the prompt in --text")
    p.add_argument("--out", default=None, help="folder for speed_<model>_<dtype>.json/.md (default: print only)")
    p.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    if "dense" not in args.methods:
        raise ValueError("--methods must include dense: speedups are measured against it")
    bad = [s for s in args.sparsity if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"--sparsity values must be in [0, 1), got {bad}")
    for name in ("prompt_len", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.offset < 0:
        raise ValueError("--offset must be >= 0")
    if args.ttft_pairs < 0:
        raise ValueError("--ttft-pairs must be >= 0")
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be >= 2 (time per output token needs two tokens)")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    bad_loops = [loop for loop in args.loops if loop not in ("native", "hf")]
    if bad_loops:
        raise ValueError(f"--loops: unknown loop(s) {bad_loops}; choose from native, hf")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; it names the folder the results go to")
    settings = _config(args)
    check_no_method_or_sparsity(settings)
    DartConfig.from_dict({**settings, "method": "dart", "sparsity": 0.5})     # a bad value fails before loading
    calibrated = [m for m in args.methods if METHODS[m].calibration is not None]
    if args.calibration_file and not calibrated:
        raise ValueError("--calibration-file: none of --methods needs one (wanda-static and threshold do)")
    if calibrated and "calibration_file" not in settings:
        raise ValueError(f"{', '.join(calibrated)} need(s) --calibration-file (make one with `dartprune calibrate`)")
    if calibrated:
        from dartprune.calibration.file import load_calibration
        calibration = load_calibration(settings["calibration_file"])
        for method in calibrated:
            for sparsity in args.sparsity:
                calibration.check_use(METHODS[method].calibration, sparsity)
    from dartprune.models import parse_device
    parse_device(args.device)


def _config(args: argparse.Namespace) -> dict:
    """The DartConfig fields every pruned method gets: --set, and --calibration-file."""
    settings = parse_settings(args.set)
    if args.calibration_file and "calibration_file" in settings:
        raise ValueError("give the calibration file once: --calibration-file, or calibration_file in --set")
    return {**settings, "calibration_file": args.calibration_file} if args.calibration_file else settings


def _stem(model: str, dtype: str) -> str:
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(model).name if Path(model).exists() else model).strip("-").lower()
    name = name.replace("smollm2-135m", "smollm2")
    return f"speed_{name}_{dtype}"


def run(args: argparse.Namespace) -> int:
    _check(args)
    import os

    import torch

    from dartprune.benchmarks.speed import BenchSettings, make_prompt, markdown_table, run_speed_benchmark, \
        write_results
    from dartprune.data import load_text
    from dartprune.models import load_model, parse_dtype

    for dtype in args.dtype:
        parse_dtype(dtype)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    settings = BenchSettings(methods=args.methods, sparsities=args.sparsity, prompt_len=args.prompt_len,
                             new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                             ttft_pairs=args.ttft_pairs, threads=args.threads or cores, loops=args.loops, device=args.device,
                             config=_config(args))
    text = load_text(args.text, args.data_dir).text
    for dtype in args.dtype:
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
        ids = make_prompt(tokenizer, args.prompt_len, text, args.offset)
        result = run_speed_benchmark(model, ids, settings, label=args.model,
                                     progress=lambda m: print(m, file=sys.stderr, flush=True))
        result["meta"]["prompt_source"] = {"text": args.text, "offset": args.offset}
        table = markdown_table(result)
        print(table, flush=True)
        if args.out:
            json_path, md_path = write_results(result, Path(args.out), _stem(args.model, dtype))
            print(f"[written {json_path} and {md_path}]", file=sys.stderr)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return 0
