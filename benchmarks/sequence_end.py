"""Time to first token of an engine that serves one sequence after another (a server, an evaluation): the previous
sequence's neurons moved back into their own order when it ended (`Engine.end_sequence`, what `generate` and the
server do) or when the next prompt starts. One `Generator`, a dense one beside it, the three interleaved. The
moving back alternates between the compiled routine and PyTorch's copies (odd repeats), to compare the two.

    python benchmarks/sequence_end.py --out benchmarks/results/speed/sequence_end.md
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune import DartConfig  # noqa: E402
from dartprune.benchmarks import publish, script_parser, timing_setup  # noqa: E402
from dartprune.decode.generate import Generator, SamplingParams  # noqa: E402
from dartprune.engine.weights import set_compiled_swap, swap_library  # noqa: E402

# the prompt and threads of the llama.cpp anchor (llamacpp_anchor.py)
THREADS, PROMPT_TOKENS, NEW_TOKENS, TEXT = 2, 256, 16, "gutenberg:austen-emma"


def main() -> None:
    parser = script_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    model, tokenizer, ids = timing_setup(args.model, THREADS, PROMPT_TOKENS, TEXT)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    lines = ["# Time to first token of a reused engine: neurons moved back at the end of a sequence or at the start "
             "of the next", "",
             f"`{' '.join(sys.argv)}`; {args.model}, float32, {THREADS} threads, prompt {PROMPT_TOKENS} tokens of "
             f"{TEXT}, {NEW_TOKENS} new tokens, {args.repeats} repeats interleaved; ratios paired per repeat "
             "(median [min-max]).", "",
             "| sparsity | TTFT dense ms | TTFT, moved back at the start | TTFT, moved back at the end | "
             "ratio end / start | moving back (end_sequence) ms, compiled | the same through PyTorch |",
             "|---|---|---|---|---|---|---|"]
    dense = Generator(model, tokenizer)
    for sparsity in (0.5, 0.7):
        with Generator(model, tokenizer, DartConfig(sparsity=sparsity)) as pruned:
            dense_ttft, at_start, at_end = [], [], []
            moving: dict[bool, list[float]] = {True: [], False: []}
            pruned.generate(ids, params)                       # warm-up
            for repeat in range(args.repeats):
                dense_ttft.append(dense.generate(ids, params).ttft_s)
                pruned.native.reset()                          # the sequence is left permuted ...
                pruned.continue_(ids, params, new_turn=False)
                pruned.native.reset()                          # ... and the next prompt moves it back
                at_start.append(pruned.continue_(ids, params, new_turn=False).ttft_s)
                compiled = repeat % 2 == 0 and swap_library() is not None
                set_compiled_swap(compiled)
                start = time.perf_counter()
                pruned.engine.end_sequence()
                moving[compiled].append(time.perf_counter() - start)
                set_compiled_swap(True)
                at_end.append(pruned.generate(ids, params).ttft_s)
        ratios = [e / s for e, s in zip(at_end, at_start)]
        med = statistics.median
        lines.append(f"| {sparsity:g} | {med(dense_ttft) * 1e3:.0f} | {med(at_start) * 1e3:.0f} "
                     f"({med(s / d for s, d in zip(at_start, dense_ttft)):.3f} of dense) | {med(at_end) * 1e3:.0f} "
                     f"({med(e / d for e, d in zip(at_end, dense_ttft)):.3f} of dense) | {med(ratios):.3f} "
                     f"[{min(ratios):.3f}-{max(ratios):.3f}] | {_ms(moving[True])} | {_ms(moving[False])} |")
    dense.close()
    publish(lines, args.out)


def _ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.1f}" if times else "-"


if __name__ == "__main__":
    main()
