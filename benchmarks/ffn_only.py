"""Where the decode-step gain goes: the FFN alone, dense vs compact, on SmolLM2's real weights and DART's budgets.

For each sparsity, DART traces a prompt, then the 30 FFNs of one decode token run (a) dense, gate and up fused
as the lean loop's dense baseline does, and (b) through the compact weights DART built. Same process, same
input, repeats interleaved. Compares the FFN time ratio with the FFN byte ratio (sum of I over sum of k). Run:
    python benchmarks/ffn_only.py --out benchmarks/results/speed/ffn_only.md
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import dartprune
from dartprune import DartConfig
from dartprune.benchmarks.speed import make_prompt, time_ms
from dartprune.data import load_text
from dartprune.models import load_model


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", dtype=args.dtype)
    ids = make_prompt(tokenizer, 256, load_text("gutenberg:austen-emma").text)
    layers = model.model.layers
    x = torch.randn(1, model.config.hidden_size, dtype=model.dtype)
    fused = [(torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight]).t().contiguous().t(),
              l.mlp.down_proj.weight.t().contiguous().t(), l.mlp.act_fn) for l in layers]

    def dense() -> None:
        for gate_up_t, down_t, act in ((w.t(), d.t(), a) for w, d, a in fused):
            gu = torch.mm(x, gate_up_t)
            size = down_t.shape[0]
            u = act(gu[:, :size])
            u.mul_(gu[:, size:])
            torch.mm(u, down_t)

    lines = [f"# FFN only: SmolLM2-135M {args.dtype}, {args.threads} threads, one decode token through 30 FFNs", "",
             "| sparsity | FFN byte ratio | dense FFN ms | compact FFN ms | FFN speedup | share of FFN gain |",
             "|---|---|---|---|---|---|"]
    for sparsity in (0.5, 0.7):
        with dartprune.attach(model, DartConfig(sparsity=sparsity)) as handle:
            model(input_ids=ids)
            compact = [ffn.compact for ffn in handle.ffns if ffn.compact is not None]
            keep = handle.stats()[0].keep_counts
            sizes = [ffn.parts.intermediate_size for ffn in handle.ffns]
            x3 = x.view(1, 1, -1)

            def pruned() -> None:
                for weights in compact:
                    weights.forward(x3)

            dense_ms, compact_ms = [], []
            for _ in range(args.repeats):
                dense_ms.append(time_ms(dense, 1, inner=20)["median"])
                compact_ms.append(time_ms(pruned, 1, inner=20)["median"])
        ratio = sum(sizes) / sum(keep)
        speedup = statistics.median(dense_ms) / statistics.median(compact_ms)
        row = (f"| {sparsity} | {ratio:.3f} | {statistics.median(dense_ms):.2f} | {statistics.median(compact_ms):.2f} "
               f"| {speedup:.3f} | {(speedup - 1) / (ratio - 1):.2f} |")
        print(row, flush=True)
        lines.append(row)
    lines += ["", f"Command: `python benchmarks/ffn_only.py --dtype {args.dtype} --threads {args.threads}"
              f"{' --out ' + args.out if args.out else ''}`"]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
