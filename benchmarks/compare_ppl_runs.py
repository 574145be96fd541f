"""Two perplexity runs (`dartprune eval --tasks ppl`) of the same windows against each other, method by method,
e.g. a bfloat16 run against the float32 one: the ratio of geometric-mean perplexities paired over the windows,
with a bootstrap 95% interval.

    python benchmarks/compare_ppl_runs.py --run benchmarks/results/ppl_smollm2/bfloat16/details.jsonl \
        --against benchmarks/results/ppl_smollm2/details.jsonl --out benchmarks/results/ppl_smollm2/bfloat16/compare.md
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune.benchmarks import publish, script_parser  # noqa: E402
from dartprune.evaluation.intervals import bootstrap, ratio_of_geomeans  # noqa: E402


def windows(path: Path) -> dict[tuple[str, float], list[float]]:
    """Per-window perplexities of each (method, sparsity) in a ppl run's details file."""
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return {(r["method"], r["sparsity"]): r["window_ppl"] for r in rows if r["task"] == "ppl"}


def main() -> None:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--against", type=Path, required=True)
    args = parser.parse_args()
    mine, theirs = windows(args.run), windows(args.against)
    lines = [f"# {args.run} against {args.against}, paired over windows", "", f"`{' '.join(sys.argv)}`", "",
             "Ratio of geometric-mean perplexities (below 1: the first run is better), bootstrap 95% interval.", "",
             "| method | sparsity | windows | geometric-mean ppl | against | ratio [95% interval] |",
             "|---|---|---|---|---|---|"]
    for key in sorted(mine.keys() & theirs.keys()):
        a, b = mine[key], theirs[key]
        if len(a) != len(b):
            raise SystemExit(f"{key[0]} at {key[1]:g}: {len(a)} windows against {len(b)}: not the same windows")
        nll_a, nll_b = [math.log(p) for p in a], [math.log(p) for p in b]
        ratio, low, high = bootstrap([nll_a, nll_b], ratio_of_geomeans)
        mean_a, mean_b = (math.exp(sum(v) / len(v)) for v in (nll_a, nll_b))
        lines.append(f"| {key[0]} | {key[1]:g} | {len(a)} | {mean_a:.1f} | {mean_b:.1f} | "
                     f"{ratio:.3f} [{low:.3f}, {high:.3f}] |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
