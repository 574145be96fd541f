"""DART variants against the static mask at the same executed sparsity, on the drift benchmark.

A variant that runs some tokens dense (the authors' `retrace=dense-steps`: after a trigger, dense for
`dense_steps` tokens, then rebuild from them) executes less sparsity than static at the same nominal sparsity, so
comparing the two at one nominal sparsity flatters it. Here the static mask runs at several sparsities (the
quality-versus-executed-sparsity curve) and each variant's sequence is compared with static's same sequence
interpolated at that sequence's executed sparsity (linearly in per-token NLL between the two static runs that
bracket it), paired over the sequences, with a bootstrap 95% interval of the ratio of geometric-mean
perplexities, after the switch, before it and on the controls.

    python benchmarks/drift_equal_sparsity.py --method 'dart[retrace=dense-steps]' \
        --method 'dart[detector=paper;window=5;monitored_layers=-1;ring_size=16]' \
        --details benchmarks/results/drift_smollm2/static_curve/details.jsonl ... \
        --out benchmarks/results/drift_smollm2/equal_sparsity.md --plot benchmarks/results/drift_smollm2/equal_sparsity.png
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune import DartConfig  # noqa: E402
from dartprune.benchmarks import publish, script_parser  # noqa: E402
from dartprune.evaluation.core import parse_method  # noqa: E402
from dartprune.evaluation.drift import PARTS, at_executed_sparsity, mean, read_details  # noqa: E402
from dartprune.evaluation.intervals import bootstrap, ratio_of_geomeans  # noqa: E402
from dartprune.methods import get_method  # noqa: E402


def part_ppl(records: dict, key: str, kind: str) -> float:
    """Geometric-mean perplexity of one run's sequences of `kind`."""
    return math.exp(mean([r[key] for r in records.values() if r["kind"] == kind]))


def main() -> None:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", required=True,
                        help="a method label as the runs wrote it (repeat for several)")
    parser.add_argument("--details", type=Path, nargs="+", required=True,
                        help="details.jsonl files of drift runs over the same sequences")
    parser.add_argument("--retrace-tokens", type=float,
                        help="also compare at equal decode time, a re-trace from the ring taking the time of this "
                        "many tokens of the full FFN (its measured wall time over the FFN's share of a dense step)")
    parser.add_argument("--plot", type=Path, help="a PNG of perplexity against executed sparsity (a method that "
                        "scores a ring also at its work sparsity: hollow marker)")
    args = parser.parse_args()
    try:
        records = read_details(args.details, {"dense", "static", *args.method})
    except ValueError as err:
        raise SystemExit(str(err)) from err
    curve = {s: runs for (m, s), runs in records.items() if m == "static"}
    if len(curve) < 2:
        raise SystemExit("the files given hold fewer than two static runs: no curve to compare against")
    rows = [("dense", 0.0)] * (("dense", 0.0) in records) + [("static", s) for s in sorted(curve)]
    missing = [m for m in args.method if not any(k[0] == m for k in records)]
    if missing:
        raise SystemExit(f"no records of {missing} in the files given")
    rows += sorted(k for k in records if k[0] in args.method)
    lines = ["# The static mask's quality against executed sparsity, and DART on it", "",
             f"`{' '.join(sys.argv)}`", "",
             "Geometric-mean perplexity over the sequences; executed sparsity over the whole sequence (the traced "
             "prompt runs dense in every method); work sparsity the same with each re-trace's scoring of the ring "
             "counted as the neuron-evaluations it does (its gate and up products over the buffered tokens); "
             "re-traces per sequence.", "",
             "| method | sparsity | executed sparsity | work sparsity | ppl before switch | ppl after switch | "
             "ppl controls | re-traces |", "|---|---|---|---|---|---|---|---|"]
    for method, sparsity in rows:
        runs = records[(method, sparsity)]
        ppl = [part_ppl(runs, key, kind) for _, key, kind in PARTS]
        work = mean([work_sparsity(method, r) for r in runs.values()])
        lines.append(f"| {method} | {sparsity:g} | {mean([r['executed_sparsity'] for r in runs.values()]):.3f} | "
                     f"{'-' if math.isnan(work) else f'{work:.3f}'} | {ppl[1]:.1f} | {ppl[0]:.1f} | {ppl[2]:.1f} | "
                     f"{mean([r['retraces'] for r in runs.values()]):.1f} |")
    lines += ["", "Each method against static, paired over the sequences: at the same nominal sparsity, at the "
              "same executed sparsity and at the same work sparsity (static interpolated at each sequence's "
              "executed or work sparsity). Ratio of geometric-mean perplexities, below 1: the method is better.",
              "", "| method | sparsity | part | sequences | vs static, same nominal sparsity | "
              "vs static, same executed sparsity | vs static, same work sparsity |"
              + (f" vs static, same time (a re-trace = {args.retrace_tokens:g} FFN tokens) |"
                 if args.retrace_tokens else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if args.retrace_tokens else "")]
    measures = {"executed": lambda m, r: r["executed_sparsity"], "work": work_sparsity}
    if args.retrace_tokens:
        measures["time"] = lambda m, r: time_sparsity(m, r, args.retrace_tokens)
    for method, sparsity in rows:
        if method in ("dense", "static"):
            continue
        runs = records[(method, sparsity)]
        for part, key, kind in PARTS:
            names = sorted(n for n, r in runs.items() if r["kind"] == kind and all(n in c for c in curve.values()))
            if not names:
                continue
            mine = [runs[n][key] for n in names]
            nominal = interval(mine, [curve[sparsity][n][key] for n in names]) if sparsity in curve else "-"
            cells = [nominal]
            for measure in measures.values():
                targets = [measure(method, runs[n]) for n in names]
                cells.append("-" if any(math.isnan(t) for t in targets) else static_at(mine, curve, names, targets, key))
            lines.append(f"| {method} | {sparsity:g} | {part} | {len(names)} | " + " | ".join(cells) + " |")
    publish(lines, args.out)
    if args.plot:
        plot(records, rows, args.plot)


def scores_ring(label: str) -> bool:
    """Whether the method re-traces by scoring a ring buffer (the dense-steps re-trace runs tokens dense instead)."""
    name, _, settings = parse_method(label)
    return get_method(name).follows_drift and settings.get("retrace", DartConfig.retrace) == "buffer"


def static_at(mine: list[float], curve: dict, names: list, targets: list[float], key: str) -> str:
    """The method against static interpolated at each sequence's target sparsity, or why not."""
    try:
        theirs = [at_executed_sparsity({s: c[n] for s, c in curve.items()}, t, key) for n, t in zip(names, targets)]
    except ValueError:
        return "outside the static runs"
    return interval(mine, theirs)


def work_sparsity(label: str, record: dict) -> float:
    """Executed sparsity with re-trace scoring counted. Runs made before it was recorded: the executed sparsity
    where the method scores no ring buffer, else unknown (NaN)."""
    if "work_sparsity" in record:
        return record["work_sparsity"]
    return math.nan if scores_ring(label) else record["executed_sparsity"]


def time_sparsity(label: str, record: dict, retrace_tokens: float) -> float:
    """Executed sparsity with each re-trace from the ring counted as `retrace_tokens` tokens of the full FFN (the
    sequence feeds all its tokens but the last)."""
    ring = record["work_sparsity"] < record["executed_sparsity"] if "work_sparsity" in record else scores_ring(label)
    if not ring:
        return record["executed_sparsity"]
    return record["executed_sparsity"] - record["retraces"] * retrace_tokens / (record["tokens"] - 1)


def interval(mine: list[float], theirs: list[float]) -> str:
    ratio, low, high = bootstrap([mine, theirs], ratio_of_geomeans)
    return f"{ratio:.3f} [{low:.3f}, {high:.3f}]"


def plot(records: dict, rows: list[tuple[str, float]], path: Path) -> None:
    from dartprune.plots import plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (part, key, kind) in zip(axes, PARTS):
        static = [(mean([r["executed_sparsity"] for r in records[("static", s)].values()]),
                   part_ppl(records[("static", s)], key, kind)) for m, s in rows if m == "static"]
        ax.plot(*zip(*static), marker="o", color="black", label="static")
        for method, sparsity in rows:
            if method in ("dense", "static"):
                continue
            runs = records[(method, sparsity)]
            ppl = part_ppl(runs, key, kind)
            executed = mean([r["executed_sparsity"] for r in runs.values()])
            work = mean([work_sparsity(method, r) for r in runs.values()])
            dot = ax.scatter(executed, ppl, s=40, label=f"{method} at {sparsity:g}")
            if not math.isnan(work) and work < executed - 1e-3:     # the same run placed at its work sparsity
                ax.plot([work, executed], [ppl, ppl], ls=":", color=dot.get_facecolor()[0])
                ax.scatter(work, ppl, s=40, facecolors="none", edgecolors=dot.get_facecolor()[0])
        ax.set_yscale("log")
        ax.set_xlabel("executed sparsity (hollow: work sparsity)")
        ax.set_title(part)
    axes[0].set_ylabel("perplexity (geometric mean)")
    axes[-1].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
