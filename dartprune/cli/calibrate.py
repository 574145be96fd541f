"""`dartprune calibrate`: measure the statistics of a calibrated baseline (wanda-static, threshold) on a text and
save them in one small safetensors file for `--calibration-file`."""
from __future__ import annotations

import argparse
from collections.abc import Callable
import sys
import time
from pathlib import Path

from dartprune.calibration.collect import calibrate
from dartprune.calibration.file import (
    DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_SPARSITIES, DEFAULT_TEXT, calibrated_methods,
)


def register(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    p = add_parser(
        "calibrate", help="calibrate wanda-static or threshold on a text (writes a --calibration-file)",
        description="Run the dense model over windows of a calibration text and save what the method needs: "
                    "per-layer input/activation norms (wanda-static) or per-layer |u| thresholds for a grid of "
                    "sparsities (threshold). Calibrate on a text that no evaluation uses.")
    p.add_argument("--method", required=True, choices=calibrated_methods())
    p.add_argument("--model", default=None, help="alias, local folder or Hugging Face id (default: smollm2-135m)")
    p.add_argument("--text", default=DEFAULT_TEXT,
                   help=f"calibration text: a file, gutenberg:NAME, wikitext2 or python:MODULE (default {DEFAULT_TEXT}, "
                        "from the local data folder); use a text that no evaluation reads")
    p.add_argument("--data-dir", help="local evaluation data folder (default: $DARTPRUNE_DATA; see docs/data.md)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="number of windows")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--sparsities", default=None,
                   help="threshold: comma-separated sparsities to store (default: 0, 0.05, ..., 0.95)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="e.g. cpu or cuda")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def parse_sparsities(value: str | None) -> list[float]:
    if value is None:
        return list(DEFAULT_SPARSITIES)
    try:
        values = [float(v) for v in value.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--sparsities expects comma-separated numbers, got {value!r}") from err
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise ValueError(f"--sparsities must be numbers in [0, 1), got {value!r}")
    return values


def run(args: argparse.Namespace) -> int:
    if args.samples < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise ValueError("--samples and --batch-size must be >= 1 and --seq-len >= 2")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; it names the calibration file to write")
    sparsities = parse_sparsities(args.sparsities)
    from dartprune.data import load_text
    text = load_text(args.text, args.data_dir)
    from dartprune.models import DEFAULT_MODEL, load_model, progress_off
    start = time.perf_counter()
    model, tokenizer = load_model(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device)
    calibration = calibrate(model, tokenizer, args.method, text, args.out, samples=args.samples,
                            seq_len=args.seq_len, batch_size=args.batch_size, sparsities=sparsities,
                            progress=not (args.no_progress or progress_off()))
    seconds = time.perf_counter() - start
    meta = calibration.meta
    print(f"{args.out}: {args.method} calibration of {meta['model']['model_type']} "
          f"({meta['model']['num_layers']} layers) on {meta['samples']} x {meta['seq_len']} tokens of {text.name} "
          f"(sha256 {meta['text']['sha256'][:12]}), {Path(args.out).stat().st_size / 1e3:.1f} kB, "
          f"{meta['seconds']:.1f} s of forwards, {seconds:.1f} s in all", file=sys.stderr)
    return 0
