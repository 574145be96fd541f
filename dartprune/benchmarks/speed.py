"""Decode speed of dense and pruned runs, measured in one process so the numbers compare (issue 6).

For each method and sparsity the same prompt is generated greedily for exactly N new tokens, after warm-up runs,
`repeats` times. Repeats are interleaved (repeat 1 of every configuration, then repeat 2, ...) so that a burst
of load from other processes hits every configuration alike, and every figure is given as median, min and max
over the repeats. Two decode loops can be measured, always labelled:

- `hf`: `model.generate` (what a user of `dartprune.attach` gets);
- `lean`: `dartprune.benchmarks.lean.LeanDecoder`, a minimal static-cache loop that removes most of the
  per-token Python overhead of Hugging Face generate, so the FFN savings are not diluted by it.

"dense" is the model with no handle attached (the honest baseline); other methods attach a handle with the given
sparsity (at sparsity 0 they run dense through the handle, which measures its bookkeeping overhead).
Speedup = dense time per output token / method time per output token, same loop, dtype and run.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

import dartprune
from dartprune.benchmarks.ceiling import (LLAMA_3_1_8B, dart_state_bytes, decode_bytes, fit_fixed_cost,
                                          kv_cache_bytes, overhead_flops, share_of_gain)
from dartprune.engine import DartConfig, attach
from dartprune.provenance import command_line
LOOPS = ("hf", "lean")


@dataclass
class BenchSettings:
    methods: list[str] = field(default_factory=lambda: ["dense", "dart", "static", "griffin"])
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.7])
    prompt_len: int = 256
    new_tokens: int = 64
    repeats: int = 5
    warmup: int = 1
    threads: int = 1
    loops: list[str] = field(default_factory=lambda: ["hf"])
    device: str = "cpu"
    forced_retraces: int = 3


# ----------------------------------------------------------------------------- prompt
def make_prompt(tokenizer, prompt_len: int, text: str, offset: int = 5000) -> torch.Tensor:
    """The first `prompt_len` tokens of `text` from character `offset` on (a fixed, reproducible prompt)."""
    chars = max(8 * prompt_len, 4000)
    ids = tokenizer(text[offset:offset + chars], return_tensors="pt").input_ids
    while ids.shape[1] < prompt_len and offset + chars < len(text):
        chars *= 2
        ids = tokenizer(text[offset:offset + chars], return_tensors="pt").input_ids
    if ids.shape[1] < prompt_len:
        raise ValueError(f"the text gives only {ids.shape[1]} tokens, fewer than --prompt-len {prompt_len}")
    return ids[:, :prompt_len]


# ----------------------------------------------------------------------------- measuring
def _sync_for(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                    # resets VmHWM, the peak resident set size of this process
    except OSError:
        pass


def _peak_memory(device: str) -> dict[str, float | None]:
    rss = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    if rss is None:
        try:
            import resource
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except ImportError:
            rss = None
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"peak_rss_mb": rss, "peak_gpu_mb": gpu}


class _Clock(BaseStreamer):
    """Streamer that only timestamps each new token (generate calls `put` with the prompt first)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.sync()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self) -> None:
        pass


@dataclass
class RunTimes:
    ttft_s: float
    decode_s: float             # first token to last token
    decode_cpu_s: float
    tokens: int
    token_median_s: float       # median time of one decode step in this run (robust to bursts of load)

    @property
    def tpot_s(self) -> float:
        return self.decode_s / max(1, self.tokens - 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.ttft_s + self.decode_s)


def _run_hf(model: nn.Module, ids: torch.Tensor, new_tokens: int, sync) -> tuple[RunTimes, torch.Tensor]:
    clock = _Clock(sync)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) else pad
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             streamer=clock, pad_token_id=pad)
    tokens = out.shape[1] - ids.shape[1]
    steps = [b - a for a, b in zip(clock.wall, clock.wall[1:])]
    return RunTimes(ttft_s=clock.wall[0] - start, decode_s=clock.wall[-1] - clock.wall[0],
                    decode_cpu_s=clock.cpu[-1] - clock.cpu[0], tokens=tokens,
                    token_median_s=statistics.median(steps)), out[0, ids.shape[1]:].cpu()


def _lean_times(result) -> RunTimes:
    return RunTimes(ttft_s=result.ttft_s, decode_s=sum(result.token_times_s), decode_cpu_s=sum(result.token_cpu_s),
                    tokens=len(result.token_times_s) + 1, token_median_s=statistics.median(result.token_times_s))


def run_lockstep(decoders: list, ids: torch.Tensor, new_tokens: int, sync: Callable[[], None] | None = None) -> list:
    """Lean decoders decode the same prompt one token each in turn, the order rotated every step, so that all see
    the same load from other processes. Returns their `LeanRun`s, in the order given."""
    runs = [decoder.begin(ids, new_tokens, sync) for decoder in decoders]
    step, more = 0, True
    while more:
        more = False
        for i in range(len(decoders)):
            turn = (i + step) % len(decoders)
            more = decoders[turn].advance(runs[turn]) or more
        step += 1
    return runs


def _run_lean_paired(dense_lean, lean, ids: torch.Tensor, new_tokens: int, sync):
    """The dense copy and the method's model in lockstep (`run_lockstep`)."""
    dense_run, run = run_lockstep([dense_lean, lean], ids, new_tokens, sync)
    return _lean_times(dense_run.result), _lean_times(run.result), run.result.tokens.cpu(), \
        dense_run.result.tokens.cpu()


def time_ms(fn: Callable[[], object], repeats: int, inner: int = 1,
            sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median/min/max milliseconds of `fn` over `repeats` samples of `inner` calls each, after one warm-up call."""
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / inner * 1e3)
    return _spread(samples)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _forced_retrace_ms(handle, count: int) -> float | None:
    """Time of a re-trace from the ring buffer, triggered by hand at the end of a run (DART's cost per
    re-trace, whether or not the drift monitor fired during the timed runs). Uses the handle's private
    `_retrace`; None if the handle has no such method."""
    retrace = getattr(handle, "_retrace", None)
    if retrace is None or not handle.rows or count < 1:
        return None
    times = []
    for _ in range(count):
        before = len(handle.rows[0].retraces)
        with torch.inference_mode():       # the lean loop leaves inference tensors behind; HF's are normal
            retrace(0, handle.rows[0].position)
        times.append(handle.rows[0].retraces[-1].seconds)
        del handle.rows[0].retraces[before:]
    return statistics.median(times) * 1e3


# ----------------------------------------------------------------------------- the benchmark
def configurations(settings: BenchSettings) -> list[tuple[str, float]]:
    """dense once (no handle), then every other method at every sparsity."""
    configs: list[tuple[str, float]] = []
    if "dense" in settings.methods:
        configs.append(("dense", 0.0))
    for sparsity in settings.sparsities:
        for method in settings.methods:
            if method != "dense":
                configs.append((method, float(sparsity)))
    return configs


@torch.no_grad()
def _own_memory(model: nn.Module) -> None:
    """Copy every weight into ordinary memory. A model loaded from safetensors reads its weights from the
    memory-mapped file, which streams slower than anonymous memory (SmolLM2 lm_head matmul: 3.2-3.4 ms mapped,
    2.7 ms copied, 2 threads), and compact weights and the lean loop's dense copy live in anonymous memory, so
    without this the comparison would favour whichever side holds the copies. Tied weights stay tied (one Parameter, copied once)."""
    for param in model.parameters():
        param.data = param.data.clone()


def run_speed_benchmark(model: nn.Module, prompt_ids: torch.Tensor, settings: BenchSettings,
                        label: str = "", progress: Callable[[str], None] | None = None) -> dict:
    """Measure every configuration and loop on an already loaded model; returns a JSON-able dict.

    hf loop: every configuration runs on its own, repeats interleaved. lean loop: a deep copy of the model runs
    dense in lockstep with each method's run (token by token), which makes the speedup a paired ratio per run;
    the dense row aggregates those paired dense runs. Every handle is detached at the end; the weights keep their
    values but are moved into ordinary memory first (see `_own_memory`)."""
    say = progress or (lambda message: None)
    torch.set_num_threads(settings.threads)
    device = settings.device
    sync = _sync_for(device)
    ids = prompt_ids.to(device)
    if device == "cpu":
        _own_memory(model)
    configs = configurations(settings)
    if ("dense", 0.0) not in configs:
        raise ValueError("the benchmark needs the dense method: speedups are relative to it")
    dtype = next(model.parameters()).dtype
    rows: list[dict] = []
    loads = [_load_average()]
    for loop in settings.loops:
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
        lean = dense_lean = None
        if loop == "lean":
            from dartprune.benchmarks.lean import LeanDecoder, lean_supported
            if not lean_supported(model):
                say(f"lean loop skipped: model type {model.config.model_type!r} is not supported by it")
                continue
            max_len = ids.shape[1] + settings.new_tokens
            lean = LeanDecoder(model, max_len)
            dense_lean = LeanDecoder(copy.deepcopy(model), max_len)
        records = {c: {"times": [], "dense_times": [], "memory": [], "stats": [], "tokens": None} for c in configs}

        def once(method: str, sparsity: float, record: dict | None) -> None:
            if loop == "lean" and method == "dense":
                return                                # measured alongside every other configuration
            handle = None if method == "dense" else attach(model, DartConfig(method=method, sparsity=sparsity))
            try:
                _reset_peak(device)
                if loop == "hf":
                    times, tokens = _run_hf(model, ids, settings.new_tokens, sync)
                    dense_times = dense_tokens = None
                else:
                    dense_times, times, tokens, dense_tokens = _run_lean_paired(dense_lean, lean, ids,
                                                                                settings.new_tokens, sync)
                if record is None:
                    return
                record["times"].append(times)
                record["memory"].append(_peak_memory(device))
                record["tokens"] = tokens.tolist()
                if dense_times is not None:
                    record["dense_times"].append(dense_times)
                    dense = records[("dense", 0.0)]
                    dense["times"].append(dense_times)
                    dense["memory"].append(record["memory"][-1])
                    dense["tokens"] = dense_tokens.tolist()
                if handle is not None:
                    stats = handle.stats()[0]
                    record["stats"].append(stats)
                    if record.get("forced_retrace_ms") is None and method == "dart" and sparsity > 0:
                        record["forced_retrace_ms"] = _forced_retrace_ms(handle, settings.forced_retraces)
            finally:
                if handle is not None:
                    handle.detach()

        for _ in range(settings.warmup):
            for method, sparsity in configs:
                once(method, sparsity, None)
        for r in range(settings.repeats):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for method, sparsity in order:
                once(method, sparsity, records[(method, sparsity)])
            say(f"[{label}] {loop}: repeat {r + 1}/{settings.repeats} done")
        loads.append(_load_average())
        rows += _summarise(model, loop, configs, records, settings)
        del lean, dense_lean
    return {
        "meta": _meta(model, label, dtype, settings, ids.shape[1], loads),
        "byte_ceilings": _ceilings_by_sparsity(model, rows),
        "fixed_cost": _fixed_costs(rows),
        "rows": rows,
        "overhead": _overhead(model, rows, settings, ids.shape[1]),
    }


def _ms(values: list[float]) -> dict[str, float]:
    return {k: v * 1e3 for k, v in _spread(values).items()}


def _speedups(loop: str, rec: dict, dense_rec: dict) -> dict:
    """Speedup over dense: paired per run in the lean loop (then median/min/max over runs); in the hf loop the
    ratio of medians (and of minima) over the independent runs."""
    times: list[RunTimes] = rec["times"]
    if rec["dense_times"]:
        pairs = list(zip(rec["dense_times"], times))
        by_mean = _spread([d.tpot_s / t.tpot_s for d, t in pairs])
        by_token = _spread([d.token_median_s / t.token_median_s for d, t in pairs])
        by_cpu = statistics.median((d.decode_cpu_s / max(1, d.tokens - 1)) / (t.decode_cpu_s / max(1, t.tokens - 1))
                                   for d, t in pairs)
        return {"speedup": by_mean["median"], "speedup_spread": by_mean, "speedup_from_min": by_mean["max"],
                "speedup_token_median": by_token["median"], "speedup_token_median_spread": by_token,
                "speedup_cpu_time": by_cpu, "paired": True}
    dense: list[RunTimes] = dense_rec["times"]

    def ratio(fn, agg) -> float:
        return agg(fn(t) for t in dense) / agg(fn(t) for t in times)

    return {"speedup": ratio(lambda t: t.tpot_s, statistics.median),
            "speedup_spread": None,
            "speedup_from_min": ratio(lambda t: t.tpot_s, min),
            "speedup_token_median": ratio(lambda t: t.token_median_s, statistics.median),
            "speedup_token_median_spread": None,
            "speedup_cpu_time": ratio(lambda t: t.decode_cpu_s / max(1, t.tokens - 1), statistics.median),
            "paired": False}


def _summarise(model, loop: str, configs, records: dict, settings: BenchSettings) -> list[dict]:
    dense_rec = records[("dense", 0.0)]
    dense_tokens = dense_rec["tokens"]
    dense_bytes = decode_bytes(model).total
    rows = []
    for method, sparsity in configs:
        rec = records[(method, sparsity)]
        times: list[RunTimes] = rec["times"]
        if not times:
            continue
        stats = rec["stats"][-1] if rec["stats"] else None
        keep = stats.keep_counts if stats is not None and method != "dense" else None
        pruned = keep is not None and any(k < size for k, size in zip(keep, stats.intermediate_sizes))
        pruned_bytes = decode_bytes(model, keep).total if pruned else dense_bytes
        ceiling = dense_bytes / pruned_bytes
        if method == "dense":
            speed = {"speedup": 1.0, "speedup_spread": None, "speedup_from_min": 1.0, "speedup_token_median": 1.0,
                     "speedup_token_median_spread": None, "speedup_cpu_time": 1.0, "paired": loop == "lean"}
        else:
            speed = _speedups(loop, rec, dense_rec)
        decode_s = statistics.median(t.decode_s for t in times)
        memory = [m["peak_rss_mb"] for m in rec["memory"] if m["peak_rss_mb"] is not None]
        row = {
            "loop": loop, "method": method, "sparsity": sparsity, "runs": len(times),
            "ttft_ms": _ms([t.ttft_s for t in times]),
            "tpot_ms": _ms([t.tpot_s for t in times]),
            "token_median_ms": _ms([t.token_median_s for t in times]),
            "tokens_per_s": _spread([t.tokens_per_s for t in times]),
            "decode_tokens_per_s": _spread([1.0 / t.tpot_s for t in times]),
            "cpu_ms_per_token": _ms([t.decode_cpu_s / max(1, t.tokens - 1) for t in times]),
            "new_tokens": times[0].tokens,
            **speed,
            "byte_ceiling": ceiling,
            "share_of_gain": share_of_gain(speed["speedup"], ceiling),
            "share_of_gain_from_min": share_of_gain(speed["speedup_from_min"], ceiling),
            "share_of_gain_token_median": share_of_gain(speed["speedup_token_median"], ceiling),
            "share_of_gain_cpu_time": share_of_gain(speed["speedup_cpu_time"], ceiling),
            "bytes_per_token": pruned_bytes,
            "peak_rss_mb": _spread(memory) if memory else None,
            "peak_gpu_mb": max(m["peak_gpu_mb"] for m in rec["memory"]) if rec["memory"] and
            rec["memory"][0]["peak_gpu_mb"] is not None else None,
            "same_tokens_as_dense": rec["tokens"] == dense_tokens,
        }
        if stats is not None:
            retrace_s = [s.retrace_seconds for s in rec["stats"]]
            forced = rec.get("forced_retrace_ms")
            row.update({
                "retrace_count": _spread([s.retrace_count for s in rec["stats"]]),
                "retrace_ms": _ms(retrace_s),
                "retrace_share_of_decode": statistics.median(retrace_s) / decode_s if decode_s else 0.0,
                "forced_retrace_ms": forced,
                "forced_retrace_tokens": forced / (statistics.median(t.token_median_s for t in times) * 1e3)
                if forced else None,
                "executed_sparsity": stats.executed_sparsity,
                "state_bytes": stats.state_bytes,
                "compact_weight_bytes": stats.compact_weight_bytes,
                "overhead_fraction": stats.overhead_fraction,
                "overhead_flops": stats.overhead_flops,
                "keep_counts": stats.keep_counts,
            })
        rows.append(row)
    return rows


def _ceilings_by_sparsity(model, rows: list[dict]) -> dict[str, dict]:
    """One byte ceiling per sparsity, from the executed keep counts of the first pruned row at it."""
    out: dict[str, dict] = {}
    dense = decode_bytes(model)
    for row in rows:
        key = f"{row['sparsity']:g}"
        if key in out or "keep_counts" not in row:
            continue
        pruned = decode_bytes(model, row["keep_counts"])
        out[key] = {"from_method": row["method"], "dense_bytes_per_token": dense.total,
                    "pruned_bytes_per_token": pruned.total, "ceiling": dense.total / pruned.total,
                    "dense_parts": dense.to_dict(), "pruned_parts": pruned.to_dict()}
    return out


def _fixed_costs(rows: list[dict]) -> dict[str, dict]:
    """Per loop, the line time per token = fixed + bytes / bandwidth through every configuration's token-median
    step time (re-trace steps and load bursts do not move a median), and what it implies for each sparsity."""
    out: dict[str, dict] = {}
    for loop in dict.fromkeys(r["loop"] for r in rows):
        mine = [r for r in rows if r["loop"] == loop]
        fit = fit_fixed_cost([r["bytes_per_token"] for r in mine], [r["token_median_ms"]["median"] for r in mine])
        if fit is None:
            continue
        by_sparsity = {f"{r['sparsity']:g}": {"share_bound": fit.share_bound(r["bytes_per_token"]),
                                              "fixed_ms_for_share_0_9": fit.fixed_ms_for_share(r["bytes_per_token"])}
                       for r in mine if r["sparsity"] > 0 and r["byte_ceiling"] > 1 + 1e-9}
        out[loop] = {**asdict(fit), "by_sparsity": by_sparsity}
    return out


def _overhead(model, rows: list[dict], settings: BenchSettings, prompt_len: int) -> dict:
    dart_rows = [r for r in rows if r["method"] == "dart" and "state_bytes" in r]
    config = DartConfig()
    llama = {f"{s:g}": dart_state_bytes(LLAMA_3_1_8B, s, config.ring_size, len(config.monitored_layers),
                                        config.window) for s in settings.sparsities if s > 0}
    flops = overhead_flops(LLAMA_3_1_8B, prompt_len, settings.new_tokens, retraces=0, ring_size=config.ring_size,
                           monitored_layers=len(config.monitored_layers), window=config.window)
    return {
        "this_model": [{"loop": r["loop"], "sparsity": r["sparsity"], "state_bytes": r["state_bytes"],
                        "compact_weight_bytes": r["compact_weight_bytes"],
                        "overhead_fraction": r["overhead_fraction"], "retrace_count": r["retrace_count"]["median"]}
                       for r in dart_rows],
        "kv_cache_bytes_at_end": kv_cache_bytes(model, prompt_len + settings.new_tokens),
        "llama_3_1_8b": {"shapes": asdict(LLAMA_3_1_8B), "state_bytes": llama,
                         "overhead_flops_no_retrace": flops,
                         "note": "state by the engine's own formula (SequenceStats.state_bytes), worst case of the "
                                 "drift window being filled; compact weights are a copy of the kept weights and "
                                 "are listed apart; FLOP fraction for this run's prompt and new-token counts"},
    }


def _load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _meta(model, label: str, dtype, settings: BenchSettings, prompt_len: int, loads) -> dict:
    import transformers
    return {
        "model": label or getattr(model.config, "_name_or_path", type(model).__name__),
        "model_type": model.config.model_type, "dtype": str(dtype).replace("torch.", ""),
        "device": settings.device, "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "load_average_before_after": loads, "prompt_len": prompt_len, "new_tokens": settings.new_tokens,
        "repeats": settings.repeats, "warmup": settings.warmup, "loops": settings.loops,
        "versions": {"dartprune": dartprune.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ----------------------------------------------------------------------------- reporting
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(result: dict) -> str:
    meta = result["meta"]
    lines = [f"### {meta['model']} {meta['dtype']} on {meta['device']} ({meta['cpu']}, "
             f"{meta['torch_threads']} torch thread(s)); prompt {meta['prompt_len']} tokens, "
             f"{meta['new_tokens']} new tokens, {meta['repeats']} repeats after {meta['warmup']} warm-up",
             "",
             "Speedup = dense time per output token / method's. hf: ratio of medians over independent runs "
             "(in brackets: ratio of minima). lean: paired, the dense copy decoding in lockstep, median [min-max] "
             "of the per-run ratios. Token-median: the same from each run's median step time (insensitive to "
             "bursts of load and to re-trace steps). Share = (speedup - 1) / (ceiling - 1).",
             "",
             "| loop | method | sparsity | TTFT ms | TPOT ms med [min-max] | tok/s | speedup | speedup token-median | "
             "ceiling | share of gain | share token-median | peak RSS MB | re-traces | re-trace ms (% decode) | "
             "executed sparsity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = r["tpot_ms"]
        retr = r.get("retrace_count")
        if r.get("speedup_spread"):
            sp = r["speedup_spread"]
            speed = f"{sp['median']:.3f} [{sp['min']:.3f}-{sp['max']:.3f}]"
            tm = r["speedup_token_median_spread"]
            token = f"{tm['median']:.3f} [{tm['min']:.3f}-{tm['max']:.3f}]"
        else:
            speed = f"{r['speedup']:.3f}" + ("" if r["method"] == "dense" else f" ({r['speedup_from_min']:.3f})")
            token = f"{r['speedup_token_median']:.3f}"
        lines.append(
            f"| {r['loop']} | {r['method']} | {r['sparsity']:g} | {r['ttft_ms']['median']:.0f} | "
            f"{t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}] | {r['tokens_per_s']['median']:.1f} | "
            f"{speed} | {token} | {r['byte_ceiling']:.3f} | {_fmt(r['share_of_gain'])} | "
            f"{_fmt(r['share_of_gain_token_median'])} | "
            f"{_fmt(r['peak_rss_mb']['median'] if r['peak_rss_mb'] else None, '.0f')} | "
            f"{'-' if retr is None else format(retr['median'], 'g')} | "
            f"{'-' if retr is None else format(r['retrace_ms']['median'], '.1f')}"
            f"{'' if retr is None else ' (' + format(100 * r['retrace_share_of_decode'], '.2f') + '%)'} | "
            f"{_fmt(r.get('executed_sparsity'), '.3f')} |")
    lines.append("")
    for key, c in result["byte_ceilings"].items():
        lines.append(f"- byte ceiling at sparsity {key}: {c['dense_bytes_per_token'] / 1e6:.1f} MB/token dense / "
                     f"{c['pruned_bytes_per_token'] / 1e6:.1f} MB/token pruned = **{c['ceiling']:.3f}** "
                     f"(keep counts of {c['from_method']})")
    for loop, fit in result.get("fixed_cost", {}).items():
        bounds = ", ".join(f"{b['share_bound']:.2f} at {s} (0.9 needs fixed <= {b['fixed_ms_for_share_0_9']:.1f} ms)"
                           for s, b in fit["by_sparsity"].items())
        lines.append(f"- {loop} loop, time per token = fixed + bytes / bandwidth (least squares over its "
                     f"{fit['points']} configurations, R^2 {fit['r_squared']:.3f}): fixed {fit['fixed_ms']:.1f} ms, "
                     f"{fit['bandwidth_gb_s']:.1f} GB/s. Share of gain this allows: {bounds}")
    forced = [r for r in result["rows"] if r.get("forced_retrace_ms")]
    for r in forced:
        lines.append(f"- forced re-trace ({r['loop']}, dart, sparsity {r['sparsity']:g}): "
                     f"{r['forced_retrace_ms']:.1f} ms = {r['forced_retrace_tokens']:.2f} decode tokens")
    over = result["overhead"]
    for item in over["this_model"]:
        lines.append(f"- DART state ({item['loop']}, sparsity {item['sparsity']:g}): "
                     f"{item['state_bytes'] / 1e6:.2f} MB; compact weights {item['compact_weight_bytes'] / 1e6:.1f} MB; "
                     f"overhead FLOPs {100 * item['overhead_fraction']:.3f}% of dense")
    for s, parts in over["llama_3_1_8b"]["state_bytes"].items():
        lines.append(f"- Llama-3.1-8B shapes, bf16, sparsity {s}: DART state {parts['total'] / 1e6:.2f} MB "
                     f"(compact weights {parts['compact_weights'] / 1e9:.2f} GB, a copy of the kept weights)")
    f = over["llama_3_1_8b"]["overhead_flops_no_retrace"]
    lines.append(f"- Llama-3.1-8B shapes: tracing + monitoring FLOPs = {100 * f['fraction']:.3f}% of dense for "
                 f"{meta['prompt_len']} + {meta['new_tokens']} tokens; each re-trace adds "
                 f"{100 * f['fraction_per_retrace']:.3f}% (the FLOPs of {f['retrace_in_dense_tokens']:.1f} dense decode tokens)")
    lines.append(f"- KV cache read at the last token: {over['kv_cache_bytes_at_end'] / 1e6:.2f} MB (not in the "
                 "ceiling)")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1, default=float))
    md_path.write_text(markdown_table(result))
    return json_path, md_path
