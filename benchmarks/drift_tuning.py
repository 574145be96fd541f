"""Choose the drift monitor's trigger count c0, cooldown and floor by measurement (docs/algorithm.md §4).

Teacher-forces text A (256-token traced prefix, 256 more tokens of A), then 256 tokens of text B, with SmolLM2
at each sparsity, and counts re-traces before and after the switch and the perplexity of each part. Pairs whose
B is A's own continuation show false triggers. The authors' dense-steps re-trace runs tokens dense, so its
executed sparsity is given too. Run:
    python benchmarks/drift_tuning.py --sparsity 0.5,0.7 --out benchmarks/results/drift_tuning.md
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import dartprune
from dartprune import DartConfig
from dartprune.data import load_text
from dartprune.models import load_model

PREFIX, SWITCH, END = 256, 512, 768
PAIRS = {
    "austen > bible": (("austen-emma.txt", 5000), ("bible-kjv.txt", 5000)),
    "melville > carroll": (("melville-moby_dick.txt", 20000), ("carroll-alice.txt", 3000)),
    "austen (one text)": (("austen-emma.txt", 5000), None),
    "melville (one text)": (("melville-moby_dick.txt", 20000), None),
}


def tokens(tokenizer, name: str, start: int, count: int) -> list[int]:
    text = load_text("gutenberg:" + name.removesuffix(".txt")).text[start:start + 40000]
    return tokenizer(text).input_ids[:count]


@torch.no_grad()
def teacher_force(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    out = model(input_ids=ids[:, :PREFIX], use_cache=True)
    logits = [out.logits]
    for start in range(PREFIX, ids.shape[1], chunk):
        out = model(input_ids=ids[:, start:start + chunk], cache=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def perplexity(logits: torch.Tensor, ids: torch.Tensor, lo: int, hi: int) -> float:
    logp = torch.log_softmax(logits[0, lo - 1:hi - 1].float(), dim=-1)
    return math.exp(float(-logp.gather(-1, ids[0, lo:hi, None]).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/drift_tuning.md")
    parser.add_argument("--sparsity", default="0.5,0.7", help="comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    texts = {}
    for name, (a, b) in PAIRS.items():
        first = tokens(tokenizer, a[0], a[1], END if b is None else SWITCH)
        texts[name] = torch.tensor([first if b is None else first + tokens(tokenizer, b[0], b[1], END - SWITCH)])
    settings = [(1, 4, 0.1, 16, 0.0), (2, 4, 0.1, 16, 0.0), (3, 4, 0.1, 16, 0.0), (3, 0, 0.1, 16, 0.0),
                (3, 4, 0.15, 16, 0.0), (3, 4, 0.1, 16, 0.3), (3, 4, 0.1, 32, 0.3)]
    grid = [("static", {})] + [
        (f"c0={c0} cooldown={cooldown} floor={floor} R={ring} blend={blend}",
         dict(trigger_count=c0, cooldown=cooldown, floor=floor, ring_size=ring, retrace_blend=blend))
        for c0, cooldown, floor, ring, blend in settings] + [
        ("defaults, retrace=dense-steps (16 tokens)", dict(retrace="dense-steps", dense_steps=16))]
    lines = ["# Drift monitor tuning (SmolLM2-135M-Instruct, float32, W=5)", "",
             f"Traced prefix {PREFIX} tokens; A continues to {SWITCH}; B from {SWITCH} to {END} "
             "(for 'one text' rows, B is A's own continuation). Re-traces counted before/after the switch. "
             "Executed: FFN sparsity over all tokens, prompt included (the prompt runs dense).", ""]
    for sparsity in (float(s) for s in args.sparsity.split(",")):
        lines += [f"## Sparsity {sparsity}", "",
                  "| pair | setting | re-traces before | after | PPL A | PPL B | executed |", "|---|---|---|---|---|---|---|"]
        for name, ids in texts.items():
            for label, overrides in grid:
                method = "static" if label == "static" else "dart"
                with dartprune.attach(model, DartConfig(method=method, sparsity=sparsity, **overrides)) as handle:
                    logits = teacher_force(model, ids, chunk=5)
                    stats = handle.stats()[0]
                before = sum(p <= SWITCH for p in stats.retrace_positions)
                row = (f"| {name} | {label} | {before} | {stats.retrace_count - before} | "
                       f"{perplexity(logits, ids, PREFIX, SWITCH):.2f} | {perplexity(logits, ids, SWITCH, END):.2f} | "
                       f"{stats.executed_sparsity:.3f} |")
                print(row, flush=True)
                lines.append(row)
        lines.append("")
    lines += [f"Command: `python benchmarks/drift_tuning.py --sparsity {args.sparsity} --out {args.out}`"]
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
