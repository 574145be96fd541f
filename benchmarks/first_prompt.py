"""The first prompt of a fresh process (what `dartprune generate` does once): building the generator, and the time
to its first token, for DART and for dense, each in its own process, the processes alternated.

A model loaded from safetensors maps its weights copy-on-write from the file; the first write to each page (the
engine's neuron swaps) faults. `--source` runs another checkout's dartprune (e.g. an older commit's) the same way.

    python benchmarks/first_prompt.py --repeats 5 --out benchmarks/results/speed/first_prompt.md
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dartprune.benchmarks import checkouts_parser, publish, revision, run_in_checkout  # noqa: E402

THREADS, PROMPT_TOKENS, NEW_TOKENS, TEXT = 2, 256, 16, "gutenberg:austen-emma"

CHILD = """
import json, sys, time
import torch
torch.set_num_threads({threads})
from dartprune import DartConfig
from dartprune.benchmarks.speed import make_prompt
from dartprune.data import load_text
from dartprune.decode.generate import Generator, SamplingParams
from dartprune.models import load_model
model, tokenizer = load_model({model!r})
ids = make_prompt(tokenizer, {prompt}, load_text({text!r}).text)[0]
sparsity = {sparsity}
start = time.perf_counter()
generator = Generator(model, tokenizer, DartConfig(sparsity=sparsity) if sparsity else None)
built = time.perf_counter() - start
out = generator.generate(ids, SamplingParams(max_new_tokens={new}, ignore_eos=True))
print(json.dumps({{"build_s": built, "ttft_s": out.ttft_s, "tpot_s": sum(out.step_s) / len(out.step_s)}}))
"""


def _run(source: Path, model: str, sparsity: float) -> dict:
    code = CHILD.format(threads=THREADS, model=model, prompt=PROMPT_TOKENS, text=TEXT, sparsity=sparsity,
                        new=NEW_TOKENS)
    return run_in_checkout(source, code)


def main() -> None:
    args = checkouts_parser(__doc__.splitlines()[0], repeats=5).parse_args()
    sources = args.source or [ROOT]
    configs = [(source, sparsity) for source in sources for sparsity in (0.0, 0.5, 0.7)]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for source, sparsity in configs:
            runs[(source, sparsity)].append(_run(source, args.model, sparsity))
    med = statistics.median
    lines = ["# The first prompt of a fresh process", "",
             f"`{' '.join(sys.argv)}`; {args.model}, float32, {THREADS} threads, prompt {PROMPT_TOKENS} tokens of "
             f"{TEXT}, {NEW_TOKENS} new tokens; one process per measurement, {args.repeats} repeats alternated; "
             "medians (TTFT ratio paired per repeat with the same checkout's dense process).", "",
             "| checkout | sparsity | building the generator ms | TTFT ms | TTFT / dense | time per output token ms |",
             "|---|---|---|---|---|---|"]
    for source, sparsity in configs:
        rows, dense = runs[(source, sparsity)], runs[(source, 0.0)]
        ratio = med(r["ttft_s"] / d["ttft_s"] for r, d in zip(rows, dense))
        name = revision(source)
        lines.append(f"| {name} | {sparsity:g} | {med(r['build_s'] for r in rows) * 1e3:.0f} | "
                     f"{med(r['ttft_s'] for r in rows) * 1e3:.0f} | {ratio:.3f} | "
                     f"{med(r['tpot_s'] for r in rows) * 1e3:.1f} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
