"""Time to first token of DART with the neuron swaps compiled (engine/swap.c) and through PyTorch's index_copy_,
against dense, in one process: each round runs the three prompt forwards in a rotating order, and each pruned
sequence ends before the next (as `generate` ends it).

    python benchmarks/ttft_swaps.py --out benchmarks/results/speed/ttft_swaps.md
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune import DartConfig  # noqa: E402
from dartprune.benchmarks import publish, script_parser, timing_setup  # noqa: E402
from dartprune.benchmarks.speed import time_prompt  # noqa: E402
from dartprune.decode.model import NativeModel  # noqa: E402
from dartprune.engine import Engine  # noqa: E402
from dartprune.engine.weights import set_compiled_swap, swap_library  # noqa: E402
from dartprune.evaluation.intervals import bootstrap, geometric_mean_ratio  # noqa: E402

THREADS, PROMPT_TOKENS, TEXT = 2, 256, "wikitext2"     # the prompt of `dartprune bench`


def main() -> None:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if swap_library() is None:
        raise SystemExit("the compiled swap cannot be built here: nothing to compare")
    model, _, ids = timing_setup(args.model, THREADS, PROMPT_TOKENS, TEXT)
    lines = ["# Time to first token: neuron swaps compiled or through PyTorch", "",
             f"`{' '.join(sys.argv)}`; {args.model}, float32, {THREADS} threads, prompt {PROMPT_TOKENS} tokens of "
             f"{TEXT}, {args.rounds} rounds after one warm-up, the order rotating; ratios are geometric means of "
             "the per-round ratios with paired bootstrap 95% intervals; ms are medians.", "",
             "| sparsity | dense ms | compiled ms | PyTorch ms | compiled / dense | PyTorch / dense | "
             "compiled / PyTorch |", "|---|---|---|---|---|---|---|"]
    dense = NativeModel(model)
    for sparsity in (0.5, 0.7):
        engine = Engine(model, DartConfig(sparsity=sparsity), widened=True)
        pruned = NativeModel(model, engine)
        runs = {"dense": (dense, True), "compiled": (pruned, True), "pytorch": (pruned, False)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.rounds + 1):
            for name in names[r % 3:] + names[:r % 3]:
                native, compiled = runs[name]
                set_compiled_swap(compiled)
                elapsed = time_prompt(native, ids)
                if r:
                    times[name].append(elapsed)
        set_compiled_swap(True)
        engine.close()

        def ratio(a: str, b: str) -> str:
            estimate, low, high = bootstrap([times[a], times[b]], geometric_mean_ratio)
            return f"{estimate:.3f} [{low:.3f}, {high:.3f}]"

        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        lines.append(f"| {sparsity:g} | {med['dense']:.0f} | {med['compiled']:.0f} | {med['pytorch']:.0f} | "
                     f"{ratio('compiled', 'dense')} | {ratio('pytorch', 'dense')} | {ratio('compiled', 'pytorch')} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
