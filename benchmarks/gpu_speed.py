"""Dense vs pruned FFN decode steps and re-trace cost at Llama-3.1-8B's shapes (random weights), on a GPU.

Part 1 (always): the FFNs of every layer (hidden 4096, intermediate 14336, 32 layers, bfloat16) decode one
token dense (three projections, as the model's own MLP does) and through `dartprune.engine.weights.PrefixFFN`
(the engine's fast path: the kept neurons permuted in place to the front of the layer's own weights and run as a
prefix, no copy), at each sparsity; timed eagerly and, on CUDA, replayed from a CUDA graph (no launch overhead:
the bandwidth-bound kernel time). Also timed: making the kept set the prefix (once per sequence, inside the time
to first token) and a re-trace (R = 16 buffered tokens through the full gate/up weights, new scores, top-k, the
entering neurons swapped into the prefix).

Part 2 (`--whole-model`, if memory allows): a whole Llama-3.1-8B-shaped model from `LlamaConfig`, random
weights, greedy decode with dartprune's native loop (`dartprune.decode`), dense vs the engine's `static` method
at each sparsity (the prompt traced, the mask fixed, uniform budgets), every decode step replayed from a CUDA
graph (`dartprune.decode.graph.GraphStep`; eager on the CPU).

Byte ceilings come from `dartprune.benchmarks.ceiling` (whole model and FFN only).

    python benchmarks/gpu_speed.py --out benchmarks/results/speed_gpu_llama8b.json            # one H200: ~2-3 min
    python benchmarks/gpu_speed.py --tiny --device cpu                                        # the CPU check
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune.architectures.base import FFNParts  # noqa: E402
from dartprune.benchmarks.ceiling import LLAMA_3_1_8B, Shapes, dart_state_bytes, shapes_decode_bytes  # noqa: E402
from dartprune.benchmarks.speed import time_ms  # noqa: E402
from dartprune.engine.scoring import squared_activations, top_neurons  # noqa: E402
from dartprune.engine.weights import PrefixFFN, activations  # noqa: E402

TINY = Shapes(layers=4, hidden=64, intermediate=224, vocab=512, heads=4, kv_heads=2, dtype_bytes=2)


def _sync(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _graph(fn, device: str):
    """`fn` captured in a CUDA graph (replay), or None off CUDA or if capture fails."""
    if not device.startswith("cuda"):
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as err:  # noqa: BLE001 - report and go on eagerly
        print(f"[cuda graph capture failed: {type(err).__name__}: {err}]", file=sys.stderr)
        return None


def make_ffns(shapes: Shapes, layers: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[FFNParts]:
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for _ in range(layers):
        def weight(rows, cols):
            return (torch.randn(rows, cols, generator=generator, device=device, dtype=torch.float32)
                    * cols ** -0.5).to(dtype)
        # down stored neuron-major, as the engine lays it out while it prunes
        parts.append(FFNParts(gate=weight(shapes.intermediate, shapes.hidden),
                              up=weight(shapes.intermediate, shapes.hidden), up_bias=None,
                              down=weight(shapes.intermediate, shapes.hidden).t(), down_bias=None, act=F.silu))
    return parts


@torch.inference_mode()
def ffn_benchmark(shapes: Shapes, layers: int, sparsities: list[float], dtype: torch.dtype, device: str,
                  repeats: int, ring: int = 16) -> dict:
    sync = _sync(device)
    parts = make_ffns(shapes, layers, dtype, device)
    x = torch.randn(1, 1, shapes.hidden, device=device, dtype=dtype)
    out = {"layers": layers, "ffn_bytes_dense": sum(p.gate.numel() * 3 * p.gate.element_size() for p in parts)}

    def dense_step():
        for p in parts:
            F.linear(F.silu(F.linear(x, p.gate)) * F.linear(x, p.up), p.down)

    out["dense_eager_ms"] = time_ms(dense_step, repeats, sync=sync)
    graph = _graph(dense_step, device)
    out["dense_graph_ms"] = time_ms(graph, repeats, sync=sync) if graph else None
    rows = []
    for sparsity in sparsities:
        keep = max(1, round((1 - sparsity) * shapes.intermediate))
        generator = torch.Generator().manual_seed(1)
        kept = [torch.randperm(shapes.intermediate, generator=generator)[:keep].sort().values for _ in parts]
        prefixes = [PrefixFFN(p) for p in parts]
        sync()
        start = time.perf_counter()
        for prefix, k in zip(prefixes, kept):
            prefix.keep(k)
        sync()
        build_ms = (time.perf_counter() - start) * 1e3

        def pruned_step():
            for prefix in prefixes:
                prefix.forward(x)

        row = {"sparsity": sparsity, "keep": keep, "build_ms": build_ms,
               "pruned_eager_ms": time_ms(pruned_step, repeats, sync=sync)}
        graph = _graph(pruned_step, device)
        row["pruned_graph_ms"] = time_ms(graph, repeats, sync=sync) if graph else None
        row["ffn_ceiling"] = shapes.intermediate / keep
        row["model_ceiling"] = shapes_decode_bytes(shapes).total / shapes_decode_bytes(shapes, keep).total
        row["speedup_eager"] = out["dense_eager_ms"]["median"] / row["pruned_eager_ms"]["median"]
        if graph and out["dense_graph_ms"]:
            row["speedup_graph"] = out["dense_graph_ms"]["median"] / row["pruned_graph_ms"]["median"]

        # exactness of the prefix path against the mask reference, one layer
        p, prefix = parts[0], prefixes[0]
        mask = prefix.mask(kept[0], dtype).to(device)         # over the current (permuted) positions
        reference = F.linear(activations(p, x) * mask, p.down)
        row["max_abs_diff_vs_mask"] = float((prefix.forward(x) - reference).abs().max())

        # re-trace: ring tokens through full gate/up, scores, top-k, entering neurons swapped into the prefix
        ring_x = torch.randn(layers, ring, shapes.hidden, device=device, dtype=dtype)
        valid = torch.ones(1, ring, dtype=torch.bool, device=device)

        def retrace():
            changed = 0
            for i, prefix in enumerate(prefixes):
                sumsq = squared_activations(prefix.activations(ring_x[i])[None], valid, "l2")[0]
                changed += prefix.keep(top_neurons(prefix.to_ids(sumsq.sqrt().cpu()), keep))
            return changed

        sync()
        start = time.perf_counter()
        row["retrace_changed_neurons"] = retrace()
        sync()
        row["retrace_ms_first"] = (time.perf_counter() - start) * 1e3
        row["retrace_ms"] = time_ms(retrace, max(3, repeats // 4), sync=sync)
        row["retrace_in_pruned_steps"] = row["retrace_ms"]["median"] / row["pruned_eager_ms"]["median"]
        rows.append(row)
        for prefix in prefixes:
            prefix.restore()
    out["rows"] = rows
    return out


def _llama(shapes: Shapes, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
                         num_hidden_layers=shapes.layers, num_attention_heads=shapes.heads,
                         num_key_value_heads=shapes.kv_heads, vocab_size=shapes.vocab,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
    return model.eval()


@torch.inference_mode()
def whole_model_benchmark(shapes: Shapes, sparsities: list[float], dtype: torch.dtype, device: str,
                          prompt_len: int, new_tokens: int, repeats: int) -> dict:
    from dartprune import DartConfig
    from dartprune.decode.graph import GraphStep
    from dartprune.decode.model import NativeModel
    from dartprune.engine import Engine

    sync = _sync(device)
    start = time.perf_counter()
    model = _llama(shapes, dtype, device)
    build_s = time.perf_counter() - start
    ids = torch.randint(3, shapes.vocab, (prompt_len,), device=device)

    def decode(engine) -> dict:
        native = NativeModel(model, engine, capacity=prompt_len + new_tokens)
        graph = GraphStep(native)                  # replayed from a CUDA graph on a GPU, eager on the CPU
        samples = []
        for _ in range(repeats):
            native.reset()
            token = int(native.forward(ids, last_only=True)[-1].argmax())
            steps = []
            for _ in range(new_tokens - 1):
                sync()
                begin = time.perf_counter()
                token = int(graph.forward(token)[-1].argmax())
                sync()
                steps.append(time.perf_counter() - begin)
            samples.append(statistics.median(steps) * 1e3)
        return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
                "cuda_graph": graph.capture}

    out = {"build_s": build_s, "params": sum(p.numel() for p in model.parameters()), "dense_tpot_ms": decode(None),
           "rows": []}
    for sparsity in sparsities:
        engine = Engine(model, DartConfig(method="static", sparsity=sparsity, allocation="uniform"))
        try:
            tpot = decode(engine)
            keep = engine.keep_counts()
        finally:
            engine.close()
        out["rows"].append({"sparsity": sparsity, "keep": keep[0], "tpot_ms": tpot,
                            "speedup": out["dense_tpot_ms"]["median"] / tpot["median"],
                            "model_ceiling": shapes_decode_bytes(shapes).total
                            / shapes_decode_bytes(shapes, keep).total})
    out["handle_on_device"] = _try_handle(model, ids[None], device)
    return out


def _try_handle(model, ids, device: str) -> str:
    """Whether `dartprune.attach` + generate runs on this device."""
    from dartprune import DartConfig, attach
    try:
        handle = attach(model, DartConfig(method="dart", sparsity=0.5))
        try:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
            return "ok: " + handle.stats()[0].summary()
        finally:
            handle.detach()
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--sparsity", default="0.5,0.7")
    parser.add_argument("--ffn-layers", type=int, default=None, help="FFN layers in part 1 (default: all)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--whole-model", action="store_true", help="also part 2 (a whole random model)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = TINY if args.tiny else LLAMA_3_1_8B
    dtype = getattr(torch, args.dtype)
    sparsities = [float(s) for s in args.sparsity.split(",")]
    torch.manual_seed(0)
    result = {"device": args.device, "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
              else "cpu", "dtype": args.dtype, "shapes": asdict(shapes), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(),
              "state_bytes": dart_state_bytes(shapes)}
    start = time.perf_counter()
    result["ffn"] = ffn_benchmark(shapes, args.ffn_layers or shapes.layers, sparsities, dtype, args.device,
                                  args.repeats)
    _report_ffn(result["ffn"])
    if args.whole_model:
        try:
            result["whole_model"] = whole_model_benchmark(shapes, sparsities, dtype, args.device, args.prompt_len,
                                                          args.new_tokens, max(2, args.repeats // 5))
            _report_whole(result["whole_model"])
        except torch.cuda.OutOfMemoryError as err:  # type: ignore[attr-defined]
            result["whole_model"] = {"skipped": f"out of memory: {err}"}
    if args.device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["seconds"] = time.perf_counter() - start
    print(f"[{result['seconds']:.1f} s]")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


def _report_ffn(ffn: dict) -> None:
    graph = ffn["dense_graph_ms"]
    print(f"FFN decode step, {ffn['layers']} layers: dense {ffn['dense_eager_ms']['median']:.3f} ms eager"
          + (f", {graph['median']:.3f} ms graph" if graph else ""))
    for r in ffn["rows"]:
        line = (f"  sparsity {r['sparsity']:g} (keep {r['keep']}): pruned {r['pruned_eager_ms']['median']:.3f} ms "
                f"eager (x{r['speedup_eager']:.2f})")
        if r.get("speedup_graph"):
            line += f", {r['pruned_graph_ms']['median']:.3f} ms graph (x{r['speedup_graph']:.2f})"
        line += (f"; FFN ceiling x{r['ffn_ceiling']:.2f}, whole-model ceiling x{r['model_ceiling']:.3f}; "
                 f"build {r['build_ms']:.1f} ms; re-trace {r['retrace_ms']['median']:.2f} ms "
                 f"(= {r['retrace_in_pruned_steps']:.1f} pruned FFN steps); |pruned - mask| "
                 f"{r['max_abs_diff_vs_mask']:.2e}")
        print(line)


def _report_whole(whole: dict) -> None:
    print(f"whole model ({whole['params'] / 1e9:.2f} B params, built in {whole['build_s']:.1f} s): dense "
          f"{whole['dense_tpot_ms']['median']:.2f} ms/token (native loop)")
    for r in whole["rows"]:
        print(f"  sparsity {r['sparsity']:g}: {r['tpot_ms']['median']:.2f} ms/token, x{r['speedup']:.3f} "
              f"(ceiling x{r['model_ceiling']:.3f})")
    print(f"  dartprune.attach on this device: {whole['handle_on_device']}")


if __name__ == "__main__":
    main()
