"""Two methods of drift-benchmark runs against each other, paired over the same sequences: the ratio of
geometric-mean perplexities with a bootstrap 95% interval, after the switch, before it and on the controls.

`dartprune eval` pairs every method with static and dense; this pairs any two, e.g. a DART setting against the
default, from the `details.jsonl` files the runs wrote (one or several: the same sequences, other methods).

    python benchmarks/compare_variants.py --method 'dart[retrace_spread=16]' --against dart \
        --details benchmarks/results/drift_tune_smollm2/retrace_spread_16/sparsity_0.5/details.jsonl ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune.benchmarks import publish  # noqa: E402
from dartprune.evaluation.drift import PARTS, read_details  # noqa: E402
from dartprune.evaluation.intervals import bootstrap, ratio_of_geomeans  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--against", required=True)
    parser.add_argument("--details", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    try:
        records = read_details(args.details, {args.method, args.against})
    except ValueError as err:
        raise SystemExit(str(err)) from err
    lines = [f"# {args.method} against {args.against}, paired", "",
             f"`{' '.join(sys.argv)}`", "", "Ratio of geometric-mean perplexities (below 1: "
             f"{args.method} is better), bootstrap 95% interval over the sequences.", "",
             "| sparsity | part | sequences | ratio [95% interval] |", "|---|---|---|---|"]
    sparsities = sorted({s for (m, s) in records if m == args.method})
    if not sparsities:
        raise SystemExit(f"no records of {args.method!r} in the files given")
    for sparsity in sparsities:
        mine, theirs = records[(args.method, sparsity)], records.get((args.against, sparsity))
        if theirs is None:
            raise SystemExit(f"no records of {args.against!r} at sparsity {sparsity} in the files given")
        for part, key, kind in PARTS:
            names = sorted(n for n, r in mine.items() if r["kind"] == kind and n in theirs)
            if not names:
                continue
            ratio, low, high = bootstrap([[mine[n][key] for n in names], [theirs[n][key] for n in names]],
                                         ratio_of_geomeans)
            lines.append(f"| {sparsity:g} | {part} | {len(names)} | {ratio:.3f} [{low:.3f}, {high:.3f}] |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
