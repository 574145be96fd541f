"""The part of a decode step that pruning cannot shrink, measured directly.

The model's own layer count, head counts and cache length, with every weight matrix shrunk to almost nothing
(hidden 8 per head, a few FFN neurons, a 512-token vocabulary): the lean loop then runs the same ops per token
as on the real model, but reads no weights to speak of, so its step time is the per-op dispatch, the Python of
the loop and of the handle, and the attention bookkeeping. Dense, static and DART (sparsity 0.5) decode in
lockstep, 150 steps each, median step time. The same step on the real model's KV cache (64-dim heads) costs more
attention; `attention_ms` times the lean loop's cache write and attention alone at the real shapes.

`ffn_bound` loads the real model and decodes it with the lean loop's dense path twice in lockstep, once with the
fused FFN weights swapped for zero-width ones: the same ops, none of the FFN's bytes. The difference is the FFN's
byte time, and from it the speedup a compact FFN could reach at best (as fast per byte as the dense one, with no
extra op), and that bound's share of the byte ceiling. Run:
    python benchmarks/fixed_cost.py --out benchmarks/results/speed/fixed_cost.md
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from dartprune.benchmarks.ceiling import decode_bytes, share_of_gain
from dartprune.benchmarks.lean import LeanDecoder
from dartprune.benchmarks.speed import _own_memory, make_prompt, run_lockstep
from dartprune.engine import attach
from dartprune.data import load_text
from dartprune.models import load_model, resolve_model


def shrunk(config) -> LlamaForCausalLM:
    """A Llama model with `config`'s layers and heads but 8-dim heads, 96 FFN neurons and 512 tokens."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    small = LlamaConfig(hidden_size=8 * heads, intermediate_size=96, num_hidden_layers=config.num_hidden_layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8, vocab_size=512,
                        max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(small).eval()


def lockstep_ms(decoders: dict[str, LeanDecoder], ids: torch.Tensor, steps: int) -> dict[str, float]:
    """Median step time of lean decoders after a warm-up run each, advancing in lockstep (`run_lockstep`)."""
    for decoder in decoders.values():
        decoder.generate(ids, 8)
    runs = run_lockstep(list(decoders.values()), ids, steps)
    return {name: statistics.median(run.result.token_times_s) * 1e3 for name, run in zip(decoders, runs)}


def step_ms(model: LlamaForCausalLM, prompt: int, steps: int, sparsity: float) -> dict[str, float]:
    """Median step time of dense, static and DART lean decoders advancing in lockstep."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    decoders = {}
    for method in ("dense", "static", "dart"):
        copy_ = copy.deepcopy(model)
        if method != "dense":
            attach(copy_, method=method, sparsity=sparsity)
        decoders[method] = LeanDecoder(copy_, prompt + max(steps, 8) + 1)
    return lockstep_ms(decoders, ids, steps)


def ffn_bound(model, ids: torch.Tensor, steps: int, sparsities: list[float]) -> dict:
    """Dense lean step with and without the FFN's bytes, and the best a compact FFN could do at each sparsity."""
    length = ids.shape[1] + max(steps, 8) + 1
    full, no_ffn = LeanDecoder(model, length), LeanDecoder(model, length)
    no_ffn.fuse_dense_ffn()
    for lay in no_ffn.layers:
        lay.gate_up_t = lay.gate_up_t[:, :0]
        lay.down_t = lay.down_t[:0]
    times = lockstep_ms({"dense": full, "no_ffn": no_ffn}, ids, steps)
    ffn_ms = times["dense"] - times["no_ffn"]
    layers = len(model.model.layers)
    size = model.config.intermediate_size
    rows = []
    for sparsity in sparsities:
        best = times["dense"] / (times["no_ffn"] + (1 - sparsity) * ffn_ms)
        ceiling = decode_bytes(model).total / decode_bytes(model, [round((1 - sparsity) * size)] * layers).total
        rows.append({"sparsity": sparsity, "best_speedup": best, "ceiling": ceiling,
                     "share": share_of_gain(best, ceiling)})
    return {**times, "ffn_ms": ffn_ms, "rows": rows}


@torch.inference_mode()
def attention_ms(config, prompt: int, steps: int) -> float:
    """The lean loop's per-token cache write and attention at the real head shapes, over all layers."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers, group, length = config.num_hidden_layers, heads // kv_heads, prompt + steps
    keys = torch.randn(layers, kv_heads, dim, length)
    values = torch.randn(layers, kv_heads, length, dim)
    qk, v = torch.randn(heads + kv_heads, dim), torch.randn(kv_heads, dim)
    times = []
    for pos in range(prompt, length):
        start = time.perf_counter()
        for layer in range(layers):
            keys[layer][:, :, pos].copy_(qk[heads:])
            values[layer][:, pos].copy_(v)
            scores = torch.bmm(qk[:heads].view(kv_heads, group, dim), keys[layer][:, :, :pos + 1])
            torch.bmm(scores.softmax(-1), values[layer][:, :pos + 1])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or folder: only its config is read")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(resolve_model(args.model))
    steps = step_ms(shrunk(config), args.prompt_len, args.steps, args.sparsity)
    attention = attention_ms(config, args.prompt_len, args.steps)
    model, tokenizer = load_model(args.model)
    _own_memory(model)
    bound = ffn_bound(model, make_prompt(tokenizer, args.prompt_len, load_text("gutenberg:austen-emma").text), args.steps, [0.5, 0.7])
    lines = [f"# Fixed cost per decode step: {args.model}'s {config.num_hidden_layers} layers and heads, weights "
             f"shrunk to nothing, {args.threads} threads, prompt {args.prompt_len}, {args.steps} steps", "",
             "| lean step, tiny weights | median ms per token |", "|---|---|"]
    lines += [f"| {method}{'' if method == 'dense' else f' @ {args.sparsity:g}'} | {ms:.2f} |"
              for method, ms in steps.items()]
    lines += [f"| cache write + attention at the real head shapes | {attention:.2f} |", "",
              f"Real weights, float32, lean dense step: {bound['dense']:.2f} ms; the same ops with zero-width FFN "
              f"weights: {bound['no_ffn']:.2f} ms; so the FFN's bytes take {bound['ffn_ms']:.2f} ms.", "",
              "| sparsity | best speedup with a compact FFN as fast per byte as the dense one | byte ceiling | "
              "share |", "|---|---|---|---|"]
    lines += [f"| {r['sparsity']:g} | {r['best_speedup']:.3f} | {r['ceiling']:.3f} | {r['share']:.2f} |"
              for r in bound["rows"]]
    lines += ["",
              f"Command: `python benchmarks/fixed_cost.py --model {args.model} --threads {args.threads} "
              f"--prompt-len {args.prompt_len} --steps {args.steps} --sparsity {args.sparsity:g}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
