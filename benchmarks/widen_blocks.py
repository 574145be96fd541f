"""Time to first token of a bfloat16 model in the native loop (which computes in float32) with its weights
widened in blocks (`engine.weights.linear`) or each widened whole as a product reads it, in one process: each
round runs both in alternating order, dense and DART at 0.5.

    python benchmarks/widen_blocks.py --out benchmarks/results/speed/bfloat16/widen_blocks.md
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dartprune.decode.model as native_model  # noqa: E402
import dartprune.engine.weights as engine_weights  # noqa: E402
from dartprune import DartConfig  # noqa: E402
from dartprune.benchmarks import publish, script_parser  # noqa: E402
from dartprune.benchmarks.speed import make_prompt, time_prompt  # noqa: E402
from dartprune.data import load_text  # noqa: E402
from dartprune.decode.model import NativeModel  # noqa: E402
from dartprune.engine import Engine  # noqa: E402
from dartprune.evaluation.intervals import bootstrap, geometric_mean_ratio  # noqa: E402
from dartprune.models import load_model  # noqa: E402

THREADS, PROMPT_TOKENS, TEXT = 2, 256, "wikitext2"     # the prompt of `dartprune bench`


def widened_whole(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The earlier way: the whole weight widened to x's dtype, then one product."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def use(linear) -> None:
    native_model.linear = linear
    engine_weights.linear = linear


def main() -> None:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    model, tokenizer = load_model(args.model, dtype="bfloat16")
    ids = make_prompt(tokenizer, PROMPT_TOKENS, load_text(TEXT).text)[0]
    ways = {"blocks": engine_weights.linear, "whole": widened_whole}
    lines = ["# Time to first token in bfloat16: weights widened in blocks or whole", "",
             f"`{' '.join(sys.argv)}`; {args.model}, bfloat16 computed in float32, {THREADS} threads, prompt "
             f"{PROMPT_TOKENS} tokens of {TEXT}, {args.rounds} rounds after one warm-up, the order alternating; "
             "the ratio is the geometric mean of the per-round ratios with a paired bootstrap 95% interval; ms "
             "are medians.", "",
             "| method | blocks ms | whole ms | blocks / whole |", "|---|---|---|---|"]
    for label in ("dense", "DART 0.5"):      # the engine after the dense rounds: it lays the weights out its own way
        engine = Engine(model, DartConfig(sparsity=0.5), widened=True) if label != "dense" else None
        native = NativeModel(model, engine)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(args.rounds + 1):
            for name in (list(ways) if r % 2 else list(ways)[::-1]):
                use(ways[name])
                elapsed = time_prompt(native, ids)
                if r:
                    times[name].append(elapsed)
        use(ways["blocks"])
        if engine is not None:
            engine.close()
        estimate, low, high = bootstrap([times["blocks"], times["whole"]], geometric_mean_ratio)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        lines.append(f"| {label} | {med['blocks']:.0f} | {med['whole']:.0f} | {estimate:.3f} [{low:.3f}, {high:.3f}] |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
