"""How many tokens a mask needs: a short prompt, and the first decoded tokens run dense and traced until
`min_trace_tokens` have been seen (the masking step).

Windows of real text (the drift benchmark's sources: novels, scripture, poetry, plays, encyclopaedia, news, code)
start with a P-token prompt; the rest is fed teacher-forced. With `min_trace_tokens = N` the tokens up to N run
dense and traced, then the mask is built. Quality is the perplexity of tokens [S, L) of every window, which every
setting predicts pruned (S >= the largest N), so the comparison isolates what the mask was traced from; the
executed sparsity over the whole window says what the dense tokens cost. Paired over windows, 95% bootstrap
intervals of the ratio of geometric-mean perplexities against N = P (the mask from the prompt alone), at the same
sparsity and at the same executed sparsity (the prompt-only mask run at the lower sparsity that executes as many
neurons over the window as N's dense tokens plus its mask).

    python benchmarks/short_prompts.py --model smollm2-135m --out benchmarks/results/short_prompts_smollm2.md
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune import DartConfig  # noqa: E402
from dartprune.benchmarks import publish  # noqa: E402
from dartprune.evaluation.core import Session, needs_bos_every_window  # noqa: E402
from dartprune.evaluation.drift import GENRES, TextSegments  # noqa: E402
from dartprune.evaluation.intervals import bootstrap, ratio_of_geomeans  # noqa: E402
from dartprune.evaluation.report import interval_text  # noqa: E402
from dartprune.models import load_model  # noqa: E402


def windows(tokenizer, length: int, per_genre: int, bos: int | None) -> list[list[int]]:
    segments = TextSegments(tokenizer, None)
    head = [bos] if bos is not None else []
    out = []
    for sources in GENRES.values():
        for k in range(per_genre):
            out.append(head + segments.take(sources[k % len(sources)], length - len(head)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", default="0.5,0.7")
    parser.add_argument("--prompt", type=int, default=10, help="P: prompt tokens")
    parser.add_argument("--min-trace", default="1,32,64,128", help="values of min_trace_tokens (1 = the prompt)")
    parser.add_argument("--score-from", type=int, default=128, help="S: first scored position")
    parser.add_argument("--length", type=int, default=320, help="L: tokens per window")
    parser.add_argument("--per-genre", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    bos = tokenizer.bos_token_id if needs_bos_every_window(model) else None
    items = windows(tokenizer, args.length, args.per_genre, bos)
    counts = [int(v) for v in args.min_trace.split(",")]
    if max(counts) > args.score_from:
        raise SystemExit("--score-from must be at least the largest --min-trace")
    first = args.score_from - args.prompt - 1           # Session.score's target j is token prompt + 1 + j
    lines = [f"# Tokens to trace from: a {args.prompt}-token prompt, {args.model}", "", f"`{' '.join(sys.argv)}`", "",
             f"{len(items)} windows of {args.length} tokens ({args.per_genre} per genre of the drift benchmark's "
             f"sources); perplexity over tokens [{args.score_from}, {args.length}) (pruned in every setting), "
             "geometric mean over windows; ratio against the mask from the prompt alone, paired, 95% bootstrap "
             "interval; executed sparsity over the whole window. Equal executed sparsity: the prompt-only mask at the "
             "sparsity given in brackets.", "",
             "| method | min_trace_tokens | ppl | ratio vs prompt-only mask | executed sparsity | "
             "ratio vs prompt-only mask at equal executed sparsity | s |",
             "|---|---|---|---|---|---|---|"]

    def run(config: DartConfig) -> tuple[list[float], float]:
        nll, executed = [], []
        with Session(model, tokenizer, config) as session:
            for ids in items:
                scored = session.score(ids, args.prompt, 16)
                nll.append(float(-scored.logprobs[first:].double().mean()))
                executed.append(session.stats()[0].executed_sparsity)
        return nll, sum(executed) / len(executed)

    started = time.perf_counter()
    dense, _ = run(DartConfig(method="dense", sparsity=0.0))
    lines.append(f"| dense | - | {math.exp(sum(dense) / len(dense)):.1f} | - | 0.000 | - | "
                 f"{time.perf_counter() - started:.0f} |")
    print(lines[-1], flush=True)
    for sparsity in [float(s) for s in args.sparsity.split(",")]:
        base = base_executed = None
        for count in counts:
            started = time.perf_counter()
            nll, executed = run(DartConfig(method="static", sparsity=sparsity, min_trace_tokens=count))
            if base is None:
                base, base_executed, ratio, equal = nll, executed, "-", "-"
            else:
                ratio = interval_text(bootstrap([nll, base], ratio_of_geomeans))
                matched = round(sparsity * executed / base_executed, 3)      # executed sparsity is ~ linear in it
                other, _ = run(DartConfig(method="static", sparsity=matched, min_trace_tokens=1))
                equal = f"{interval_text(bootstrap([nll, other], ratio_of_geomeans))} (at {matched:g})"
            shown = f"{count} (the prompt)" if count <= args.prompt else str(count)
            lines.append(f"| static@{sparsity:g} | {shown} | {math.exp(sum(nll) / len(nll)):.1f} | {ratio} | "
                         f"{executed:.3f} | {equal} | {time.perf_counter() - started:.0f} |")
            print(lines[-1], flush=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
