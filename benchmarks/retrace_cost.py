"""What one re-trace costs, for DART at 0.5 and 0.7, across checkouts: each process decodes from the same prompt
and forces a re-trace every few tokens; the processes of the checkouts alternate. Also says whether the
checkouts decoded the same tokens and ended with the same kept sets and scores (a speed change must not change
them).

    git worktree add ../before HEAD~1
    python benchmarks/retrace_cost.py --source . --source ../before --out benchmarks/results/speed/retrace_cost.md

`--dtype bfloat16` casts the model after loading it (any checkout can do that).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dartprune.benchmarks import checkouts_parser, publish, revision, run_in_checkout  # noqa: E402

THREADS, PROMPT_TOKENS, TEXT, RETRACES, EVERY = 2, 256, "wikitext2", 8, 6

CHILD = """
import hashlib, json, statistics, time
import torch
from dartprune import DartConfig
from dartprune.benchmarks import timing_setup
from dartprune.decode.model import NativeModel
from dartprune.engine import Engine
model, _, ids = timing_setup({model!r}, {threads}, {prompt}, {text!r})
model = model.to(getattr(torch, {dtype!r}))
out = {{}}
for sparsity in (0.5, 0.7):
    engine = Engine(model, DartConfig(sparsity=sparsity), widened=True)
    native = NativeModel(model, engine)
    token, tokens, seconds = int(native.forward(ids, last_only=True)[-1].argmax()), [], []
    for _ in range({retraces}):
        for _ in range({every}):
            token = int(native.forward(torch.tensor([token]))[-1].argmax())
            tokens.append(token)
        start = time.perf_counter()
        engine.retrace(0)
        seconds.append(time.perf_counter() - start)
    state = hashlib.sha1(json.dumps(tokens).encode())
    for layer in range(len(engine.sizes)):
        state.update(engine.kept(0, layer).numpy().tobytes())
        state.update(engine.scores(0, layer).numpy().tobytes())
    out[str(sparsity)] = {{"ms": statistics.median(seconds[1:]) * 1e3, "state": state.hexdigest()[:12]}}
    engine.close()
print(json.dumps(out))
"""


def main() -> None:
    parser = checkouts_parser(__doc__.splitlines()[0], repeats=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    sources = args.source or [ROOT]
    code = CHILD.format(model=args.model, dtype=args.dtype, threads=THREADS, prompt=PROMPT_TOKENS, text=TEXT,
                        retraces=RETRACES, every=EVERY)
    runs: dict[Path, list[dict]] = {source: [] for source in sources}
    for _ in range(args.repeats):
        for source in sources:
            runs[source].append(run_in_checkout(source, code))
    lines = ["# What one re-trace costs", "",
             f"`{' '.join(sys.argv)}`; {args.model}, {args.dtype}, {THREADS} threads, prompt {PROMPT_TOKENS} tokens of "
             f"{TEXT}, greedy; a re-trace forced every {EVERY} decoded tokens, {RETRACES} per process (the first "
             f"left out); one process per checkout and repeat, {args.repeats} repeats alternated. ms: median over "
             "the processes of each one's median; `state`: a hash of the decoded tokens and the final kept sets and "
             "scores (equal: the checkouts computed the same).", "",
             "| checkout | sparsity | re-trace ms | vs the first checkout | state |", "|---|---|---|---|---|"]
    first = sources[0]
    for source in sources:
        for sparsity in ("0.5", "0.7"):
            ms = statistics.median(r[sparsity]["ms"] for r in runs[source])
            base = statistics.median(r[sparsity]["ms"] for r in runs[first])
            states = sorted({r[sparsity]["state"] for r in runs[source]})
            lines.append(f"| {revision(source)} | {sparsity} | {ms:.1f} | {ms / base:.2f} | {', '.join(states)} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
