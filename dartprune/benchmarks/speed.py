"""Decode speed of dense and pruned runs, measured in one process so that the numbers compare.

For each method and sparsity the same prompt is decoded greedily for exactly N new tokens, after warm-up runs,
`repeats` times, repeats interleaved across configurations. Two loops, labelled in every row:

- `native`: dartprune's own loop (`dartprune.decode`: the compiled step where it builds, else its PyTorch step),
  what `dartprune generate` runs for the Llama and Gemma families. A dense native loop over the same weights
  decodes in lockstep with each pruned run, token by token (the order alternating), so every speedup is a paired
  ratio from one run and both sides see the same load from other processes. The dense loop reads the weights in
  the layout the engine gives them: neuron-major down projections in float32, where dense runs as fast either way,
  the model's own layout where that layout would slow dense (bfloat16 and float16 on a CPU, see engine/weights.py);
- `hf`: `model.generate` with the engine attached (what `dartprune.attach` users get); its ratios are of medians
  over independent runs.

Speedup = dense time per output token / the method's. The byte ceiling (bytes a step reads, dense over pruned) is
what a bandwidth-bound step could reach; share of gain = (speedup - 1) / (ceiling - 1).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
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
from dartprune.decode.kernel import unavailable_reason
from dartprune.decode.model import NativeModel, native_supported
from dartprune.engine import DartConfig, Engine, attach
from dartprune.engine.phase import Phase
from dartprune.engine.weights import swap_library
from dartprune.evaluation.intervals import bootstrap, geometric_mean_ratio
from dartprune.models import check_context
from dartprune.provenance import command_line

LOOPS = ("native", "hf")


@dataclass
class BenchSettings:
    methods: list[str] = field(default_factory=lambda: ["dense", "dart", "static", "griffin"])
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.7])
    prompt_len: int = 256
    new_tokens: int = 64
    repeats: int = 5
    warmup: int = 1
    threads: int = 1
    loops: list[str] = field(default_factory=lambda: ["native"])
    device: str = "cpu"
    forced_retraces: int = 3
    ttft_pairs: int = 10               # extra prompt forwards of dense and each pruned method, interleaved (native)
    config: dict = field(default_factory=dict)       # other DartConfig fields for every pruned method


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
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


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
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"peak_rss_mb": rss, "peak_gpu_mb": gpu}


@dataclass
class RunTimes:
    ttft_s: float
    steps_s: list[float]               # every token after the first

    @property
    def tokens(self) -> int:
        return len(self.steps_s) + 1

    @property
    def tpot_s(self) -> float:
        return sum(self.steps_s) / max(1, len(self.steps_s))

    @property
    def token_median_s(self) -> float:
        return statistics.median(self.steps_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.ttft_s + sum(self.steps_s))


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


class _Decode:
    """One native sequence advanced a token at a time (so that two can alternate)."""

    def __init__(self, native: NativeModel, ids: torch.Tensor, sync: Callable[[], None]):
        self.native, self.sync = native, sync
        native.reset()
        start = time.perf_counter()
        self.token = int(native.forward(ids[0], last_only=True)[-1].argmax())
        sync()
        self.times = RunTimes(time.perf_counter() - start, [])
        self.tokens = [self.token]

    def advance(self) -> None:
        start = time.perf_counter()
        self.token = int(self.native.forward(torch.tensor([self.token]))[-1].argmax())
        self.sync()
        self.times.steps_s.append(time.perf_counter() - start)
        self.tokens.append(self.token)


def run_lockstep(natives: list[NativeModel], ids: torch.Tensor, new_tokens: int,
                 sync: Callable[[], None] = lambda: None,
                 at_step: Callable[[int], None] | None = None) -> list[_Decode]:
    """Native loops decode the same prompt one token each in turn, the order rotated every step, so that all see
    the same load from other processes. `at_step(step)` runs before each step (forced re-traces)."""
    for native in natives:
        native.reserve(ids.numel() + new_tokens)
    runs = [_Decode(native, ids, sync) for native in natives]
    for step in range(1, new_tokens):
        if at_step is not None:
            at_step(step)
        for i in range(len(runs)):
            runs[(i + step) % len(runs)].advance()
    return runs


def paired_speedup(pruned: NativeModel, ids: torch.Tensor, new_tokens: int) -> float:
    """Dense time per output token over `pruned`'s, from one run of the native bench: a dense native loop over the
    same weights decodes the prompt `ids` in turn with `pruned`, token by token, so both see the same load (two
    runs one after the other on a shared machine differ by more than what pruning saves on a short reply)."""
    dense_run, run = run_lockstep([NativeModel(pruned.model, None), pruned], ids.reshape(1, -1), new_tokens)
    return dense_run.times.tpot_s / run.times.tpot_s


class _Clock(BaseStreamer):
    """Streamer that timestamps each new token (generate calls `put` with the prompt first)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync, self.wall, self._prompt_seen = sync, [], False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.sync()
        self.wall.append(time.perf_counter())

    def end(self) -> None:
        pass


def _run_hf(model: nn.Module, ids: torch.Tensor, new_tokens: int, sync) -> tuple[RunTimes, list[int]]:
    clock = _Clock(sync)
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             streamer=clock, pad_token_id=pad)
    steps = [b - a for a, b in zip(clock.wall, clock.wall[1:])]
    return RunTimes(clock.wall[0] - start, steps), out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def _own_memory(model: nn.Module) -> None:
    """Copy every weight into ordinary memory. A model loaded from safetensors reads its weights from the memory-
    mapped file, which streamed about 15% slower than anonymous memory here; tied weights stay tied."""
    for param in model.parameters():
        param.data = param.data.clone()


# ----------------------------------------------------------------------------- the benchmark
def configurations(settings: BenchSettings) -> list[tuple[str, float]]:
    """dense once, then every other method at every sparsity."""
    configs: list[tuple[str, float]] = [("dense", 0.0)] if "dense" in settings.methods else []
    for sparsity in settings.sparsities:
        configs += [(method, float(sparsity)) for method in settings.methods if method != "dense"]
    return configs


def run_speed_benchmark(model: nn.Module, prompt_ids: torch.Tensor, settings: BenchSettings,
                        label: str = "", progress: Callable[[str], None] | None = None) -> dict:
    """Measure every configuration and loop on an already loaded model; returns a JSON-able dict."""
    say = progress or (lambda message: None)
    check_context(model, prompt_ids.shape[-1] + settings.new_tokens,
                  f"a prompt of {prompt_ids.shape[-1]} tokens and {settings.new_tokens} new tokens")
    torch.set_num_threads(settings.threads)
    sync = _sync_for(settings.device)
    ids = prompt_ids.to(settings.device)
    if settings.device == "cpu":
        _own_memory(model)
    configs = configurations(settings)
    if ("dense", 0.0) not in configs:
        raise ValueError("the benchmark needs the dense method: speedups are relative to it")
    rows: list[dict] = []
    for loop in settings.loops:
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
        if loop == "native" and not native_supported(model):
            say(f"native loop skipped: model type {model.config.model_type!r} runs on Hugging Face generate")
            continue
        records = {c: {"times": [], "dense_times": [], "memory": [], "stats": [], "tokens": None} for c in configs}
        measure = _native_once if loop == "native" else _hf_once
        for _ in range(settings.warmup):
            for method, sparsity in configs:
                measure(model, ids, settings, method, sparsity, None, records, sync)
        for r in range(settings.repeats):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for method, sparsity in order:
                measure(model, ids, settings, method, sparsity, records[(method, sparsity)], records, sync,
                        last=r == settings.repeats - 1)
            say(f"[{label}] {loop}: repeat {r + 1}/{settings.repeats} done")
        if loop == "native" and settings.ttft_pairs > 0:
            for method, sparsity in configs:
                if method != "dense":
                    records[(method, sparsity)]["ttft_paired"] = _ttft_pairs(model, ids, settings, method, sparsity,
                                                                             sync)
            say(f"[{label}] {loop}: time to first token measured")
        rows += _summarise(model, loop, configs, records)
    return {
        "meta": _meta(model, label, settings, ids.shape[1]),
        "byte_ceilings": _ceilings_by_sparsity(model, rows),
        "fixed_cost": _fixed_costs(rows),
        "rows": rows,
        "overhead": _overhead(model, rows, settings, ids.shape[1]),
    }


def _config(settings: BenchSettings, method: str, sparsity: float) -> DartConfig:
    return DartConfig.from_dict({**settings.config, "method": method, "sparsity": sparsity})


def _native_once(model, ids, settings: BenchSettings, method: str, sparsity: float, record: dict | None,
                 records: dict, sync, last: bool = False) -> None:
    """The method's native loop in lockstep with a dense native loop over the same weights."""
    if method == "dense":
        return                                    # measured alongside every other configuration
    engine = Engine(model, _config(settings, method, sparsity), widened=True)
    try:
        pruned, dense = NativeModel(model, engine), NativeModel(model, None)
        _reset_peak(settings.device)
        at_step, carrying = None, []
        if last and engine.follows_drift and settings.config.get("retrace_spread", 1) > 1:
            def at_step(step: int) -> None:       # one re-trace spread over the following steps, timed with them
                if step == settings.new_tokens // 2:
                    engine.retrace(0, now=False)
                if engine.phase(0) is Phase.RETRACING:
                    carrying.append(step - 1)     # this step re-scores a share of the layers (its index in steps_s)
        dense_run, run = run_lockstep([dense, pruned], ids, settings.new_tokens, sync, at_step)
        if record is None:
            return
        memory = _peak_memory(settings.device)
        stats = engine.stats()[0]
        record["times"].append(run.times)
        record["dense_times"].append(dense_run.times)
        record["memory"].append(memory)
        record["tokens"] = run.tokens
        record["stats"].append(stats)
        dense = records[("dense", 0.0)]
        dense["times"].append(dense_run.times)
        dense["memory"].append(memory)
        dense["tokens"] = dense_run.tokens
        if at_step is not None:
            steps, median = run.times.steps_s, run.times.token_median_s
            record["spread_retrace_max_over_median"] = max(steps) / median
            record["spread_retrace_steps"] = {"count": len(carrying),
                                              "median_over_median": statistics.median(steps[i] for i in carrying)
                                              / median,
                                              "max_over_median": max(steps[i] for i in carrying) / median}
        if last and engine.follows_drift and sparsity > 0:
            record.update(_forced_retraces(engine, settings.forced_retraces))
        record["kernel"] = pruned.kernel is not None
    finally:
        engine.close()


def _hf_once(model, ids, settings: BenchSettings, method: str, sparsity: float, record: dict | None,
             records: dict, sync, last: bool = False) -> None:
    handle = None if method == "dense" else attach(model, _config(settings, method, sparsity))
    try:
        _reset_peak(settings.device)
        times, tokens = _run_hf(model, ids, settings.new_tokens, sync)
        if record is None:
            return
        record["times"].append(times)
        record["memory"].append(_peak_memory(settings.device))
        record["tokens"] = tokens
        if handle is not None:
            record["stats"].append(handle.stats()[0])
            if last and handle.engine.follows_drift and sparsity > 0:
                record.update(_forced_retraces(handle.engine, settings.forced_retraces))
    finally:
        if handle is not None:
            handle.detach()


def time_prompt(native: NativeModel, ids: torch.Tensor, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds to the first token of a new sequence from the prompt `ids` ([tokens]). A pruned sequence is then
    ended as `Generator.generate` ends it, so the next start has no neurons to move back."""
    native.reset()
    start = time.perf_counter()
    int(native.forward(ids, last_only=True)[-1].argmax())
    sync()
    elapsed = time.perf_counter() - start
    if native.engine is not None:
        native.engine.end_sequence()
    return elapsed


def _ttft_pairs(model, ids, settings: BenchSettings, method: str, sparsity: float, sync) -> dict:
    """Time to first token over dense's from `settings.ttft_pairs` pairs of prompt forwards, the order alternating
    within pairs (a lone pair per run, as in the lockstep runs, moves by a tenth between runs here). One engine
    serves every pair and ends each sequence as `Generator.generate` does, so no start has neurons to move back.
    Geometric mean of the per-pair ratios with a paired bootstrap 95% interval."""
    engine = Engine(model, _config(settings, method, sparsity), widened=True)
    try:
        natives = {"dense": NativeModel(model, None), "pruned": NativeModel(model, engine)}
        times: dict[str, list[float]] = {"dense": [], "pruned": []}
        for pair in range(settings.ttft_pairs + 1):            # the first pair warms up
            for name in (("dense", "pruned") if pair % 2 else ("pruned", "dense")):
                elapsed = time_prompt(natives[name], ids[0], sync)
                if pair:
                    times[name].append(elapsed)
    finally:
        engine.close()
    estimate, low, high = bootstrap([times["pruned"], times["dense"]], geometric_mean_ratio)
    return {"ratio": estimate, "low": low, "high": high, "pairs": settings.ttft_pairs,
            "dense_ms": statistics.median(times["dense"]) * 1e3, "pruned_ms": statistics.median(times["pruned"]) * 1e3}


def _forced_retraces(engine: Engine, count: int) -> dict:
    """Re-traces forced at the end of a reply. The first is what a re-trace costs in use: scored from tokens the
    masks were not built on, it moves many neurons. The later ones re-score the same tokens and move almost none
    (the scoring alone)."""
    records = [engine.retrace(0) for _ in range(max(1, count))]
    return {"forced_retrace_ms": records[0].seconds * 1e3,
            "forced_retrace_neurons": sum(records[0].neurons_changed),
            "repeated_retrace_ms": statistics.median(r.seconds for r in records[1:]) * 1e3 if count > 1 else None}


def _ms(values: list[float]) -> dict[str, float]:
    return {k: v * 1e3 for k, v in _spread(values).items()}


def _speedups(rec: dict, dense_rec: dict) -> dict:
    """Paired per run (native: then median/min/max over runs), or the ratio of medians and of minima (hf)."""
    times: list[RunTimes] = rec["times"]
    if rec["dense_times"]:
        pairs = list(zip(rec["dense_times"], times))
        by_mean = _spread([d.tpot_s / t.tpot_s for d, t in pairs])
        by_token = _spread([d.token_median_s / t.token_median_s for d, t in pairs])
        ttft = statistics.median(t.ttft_s / d.ttft_s for d, t in pairs)
        return {"speedup": by_mean["median"], "speedup_spread": by_mean, "speedup_from_min": by_mean["max"],
                "speedup_token_median": by_token["median"], "speedup_token_median_spread": by_token,
                "ttft_over_dense": ttft, "paired": True}
    dense: list[RunTimes] = dense_rec["times"]

    def ratio(fn, agg) -> float:
        return agg(fn(t) for t in dense) / agg(fn(t) for t in times)

    return {"speedup": ratio(lambda t: t.tpot_s, statistics.median), "speedup_spread": None,
            "speedup_from_min": ratio(lambda t: t.tpot_s, min),
            "speedup_token_median": ratio(lambda t: t.token_median_s, statistics.median),
            "speedup_token_median_spread": None,
            "ttft_over_dense": 1 / ratio(lambda t: t.ttft_s, statistics.median), "paired": False}


def _summarise(model, loop: str, configs, records: dict) -> list[dict]:
    dense_rec = records[("dense", 0.0)]
    dense_bytes = decode_bytes(model).total
    model_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    rows = []
    for method, sparsity in configs:
        rec = records[(method, sparsity)]
        times: list[RunTimes] = rec["times"]
        if not times:
            continue
        stats = rec["stats"][-1] if rec["stats"] else None
        keep = stats.keep_counts if stats is not None else None
        pruned = keep is not None and any(k < size for k, size in zip(keep, stats.intermediate_sizes))
        pruned_bytes = decode_bytes(model, keep).total if pruned else dense_bytes
        ceiling = dense_bytes / pruned_bytes
        if method == "dense":
            speed = {"speedup": 1.0, "speedup_spread": None, "speedup_from_min": 1.0, "speedup_token_median": 1.0,
                     "speedup_token_median_spread": None, "ttft_over_dense": 1.0, "paired": loop == "native"}
        else:
            speed = _speedups(rec, dense_rec)
        memory = [m["peak_rss_mb"] for m in rec["memory"] if m["peak_rss_mb"] is not None]
        steps = [s for t in times for s in t.steps_s]
        row = {
            "loop": loop, "method": method, "sparsity": sparsity, "runs": len(times),
            "ttft_ms": _ms([t.ttft_s for t in times]), "tpot_ms": _ms([t.tpot_s for t in times]),
            "token_median_ms": _ms([t.token_median_s for t in times]),
            "max_step_over_median": max(steps) / statistics.median(steps),
            "tokens_per_s": _spread([t.tokens_per_s for t in times]),
            "new_tokens": times[0].tokens, **speed, "byte_ceiling": ceiling,
            "share_of_gain": share_of_gain(speed["speedup"], ceiling),
            "share_of_gain_from_min": share_of_gain(speed["speedup_from_min"], ceiling),
            "share_of_gain_token_median": share_of_gain(speed["speedup_token_median"], ceiling),
            "bytes_per_token": pruned_bytes,
            "peak_rss_mb": _spread(memory) if memory else None,
            "peak_gpu_mb": max(m["peak_gpu_mb"] for m in rec["memory"]) if rec["memory"] and
            rec["memory"][0]["peak_gpu_mb"] is not None else None,
            "same_tokens_as_dense": rec["tokens"] == dense_rec["tokens"],
            "kernel": rec.get("kernel"),
            "ttft_paired": rec.get("ttft_paired"),
        }
        if stats is not None:
            retrace_s = [s.retrace_seconds for s in rec["stats"]]
            decode_s = statistics.median(sum(t.steps_s) for t in times)
            forced = rec.get("forced_retrace_ms")
            row.update({
                "retrace_count": _spread([s.retrace_count for s in rec["stats"]]),
                "retrace_ms": _ms(retrace_s),
                "retrace_share_of_decode": statistics.median(retrace_s) / decode_s if decode_s else 0.0,
                "forced_retrace_ms": forced,
                "forced_retrace_neurons": rec.get("forced_retrace_neurons"),
                "repeated_retrace_ms": rec.get("repeated_retrace_ms"),
                "forced_retrace_tokens": forced / row["token_median_ms"]["median"] if forced else None,
                "spread_retrace_max_over_median": rec.get("spread_retrace_max_over_median"),
                "spread_retrace_steps": rec.get("spread_retrace_steps"),
                "executed_sparsity": stats.executed_sparsity,
                "state_bytes": stats.state_bytes,
                "extra_bytes": stats.state_bytes,          # no weights are copied: the state is all
                "extra_share_of_model": stats.state_bytes / model_bytes,
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
    step time, and what it implies for each sparsity."""
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
    llama = {f"{s:g}": dart_state_bytes(LLAMA_3_1_8B, _config(settings, "dart", s)) for s in settings.sparsities
             if s > 0}
    flops = overhead_flops(LLAMA_3_1_8B, prompt_len, settings.new_tokens, retraces=0,
                           config=_config(settings, "dart", max(settings.sparsities)))
    return {
        "this_model": [{"loop": r["loop"], "sparsity": r["sparsity"], "state_bytes": r["state_bytes"],
                        "extra_share_of_model": r["extra_share_of_model"],
                        "overhead_fraction": r["overhead_fraction"], "retrace_count": r["retrace_count"]["median"]}
                       for r in dart_rows],
        "kv_cache_bytes_at_end": kv_cache_bytes(model, prompt_len + settings.new_tokens),
        "llama_3_1_8b": {"shapes": asdict(LLAMA_3_1_8B), "state_bytes": llama, "overhead_flops_no_retrace": flops,
                         "note": "state by the engine's own formula (dartprune.engine.costs); pruning copies no "
                                 "weights; FLOP fraction for this run's prompt and new-token counts"},
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _meta(model, label: str, settings: BenchSettings, prompt_len: int) -> dict:
    import transformers
    return {
        "model": label or getattr(model.config, "name_or_path", "") or type(model).__name__,
        "model_type": model.config.model_type, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": settings.device, "torch_threads": torch.get_num_threads(), "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(), "prompt_len": prompt_len, "new_tokens": settings.new_tokens,
        "repeats": settings.repeats, "warmup": settings.warmup, "loops": settings.loops, "config": settings.config,
        "compiled_step": unavailable_reason() or "used where it applies", "ttft_pairs": settings.ttft_pairs,
        "compiled_swap": "used" if swap_library() is not None else "unavailable (PyTorch's index_copy_)",
        "versions": {"dartprune": dartprune.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "command": command_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ----------------------------------------------------------------------------- reporting
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _memory(row: dict) -> str:
    extra = row.get("extra_bytes")
    return "-" if extra is None else f"{extra / 1e6:.2f} MB ({100 * row['extra_share_of_model']:.2f}%)"


def markdown_table(result: dict) -> str:
    meta = result["meta"]
    lines = [f"### {meta['model']} {meta['dtype']} on {meta['device']} ({meta['cpu']}, {meta['torch_threads']} "
             f"thread(s)); prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new tokens, {meta['repeats']} "
             f"repeats after {meta['warmup']} warm-up",
             "",
             "Speedup = dense time per output token / method's. native: paired, a dense native loop over the same "
             "weights decoding in lockstep, median [min-max] of the per-run ratios. hf: ratio of medians over "
             "independent runs (in brackets: ratio of minima). Token-median: the same from each run's median step "
             "(insensitive to bursts of load and to re-trace steps). Share = (speedup - 1) / (ceiling - 1). "
             "Max step: the slowest step over the median step, all runs. TTFT vs dense: from the interleaved pairs "
             "of prompt forwards where they were measured (listed below), else from each run's one prefill.",
             "",
             "| loop | method | sparsity | TTFT ms (vs dense) | TPOT ms med [min-max] | tok/s | speedup | "
             "speedup token-median | ceiling | share of gain | share token-median | max step | re-traces | "
             "executed sparsity | extra memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = r["tpot_ms"]
        retr = r.get("retrace_count")
        if r.get("speedup_spread"):
            sp, tm = r["speedup_spread"], r["speedup_token_median_spread"]
            speed = f"{sp['median']:.3f} [{sp['min']:.3f}-{sp['max']:.3f}]"
            token = f"{tm['median']:.3f} [{tm['min']:.3f}-{tm['max']:.3f}]"
        else:
            speed = f"{r['speedup']:.3f}" + ("" if r["method"] == "dense" else f" ({r['speedup_from_min']:.3f})")
            token = f"{r['speedup_token_median']:.3f}"
        ttft = r["ttft_paired"]["ratio"] if r.get("ttft_paired") else r["ttft_over_dense"]
        lines.append(
            f"| {r['loop']} | {r['method']} | {r['sparsity']:g} | {r['ttft_ms']['median']:.0f} "
            f"({ttft:.2f}) | {t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}] | "
            f"{r['tokens_per_s']['median']:.1f} | {speed} | {token} | {r['byte_ceiling']:.3f} | "
            f"{_fmt(r['share_of_gain'])} | {_fmt(r['share_of_gain_token_median'])} | "
            f"{r['max_step_over_median']:.2f} | {'-' if retr is None else format(retr['median'], 'g')} | "
            f"{_fmt(r.get('executed_sparsity'), '.3f')} | "
            f"{_memory(r)} |")
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
    for r in result["rows"]:
        if r.get("ttft_paired"):
            t = r["ttft_paired"]
            lines.append(f"- time to first token ({r['loop']}, {r['method']}, sparsity {r['sparsity']:g}), "
                         f"{t['pairs']} interleaved pairs of prompt forwards: **{t['ratio']:.3f}** "
                         f"[{t['low']:.3f}, {t['high']:.3f}] of dense's ({t['pruned_ms']:.0f} ms against "
                         f"{t['dense_ms']:.0f} ms, medians)")
        if r.get("forced_retrace_ms"):
            repeated = (f"; again on the same tokens {r['repeated_retrace_ms']:.1f} ms"
                        if r.get("repeated_retrace_ms") is not None else "")
            lines.append(f"- forced re-trace ({r['loop']}, {r['method']}, sparsity {r['sparsity']:g}): "
                         f"{r['forced_retrace_ms']:.1f} ms = {r['forced_retrace_tokens']:.2f} decode steps, "
                         f"{r['forced_retrace_neurons']} neurons moved{repeated}")
        if r.get("spread_retrace_steps"):
            carried = r["spread_retrace_steps"]
            lines.append(f"- re-trace spread over the following steps ({r['loop']}, {r['method']}, sparsity "
                         f"{r['sparsity']:g}): {carried['count']} steps carried it, the median of them "
                         f"{carried['median_over_median']:.2f}x and the slowest {carried['max_over_median']:.2f}x "
                         f"the median step; the run's slowest step {r['spread_retrace_max_over_median']:.2f}x")
    over = result["overhead"]
    for s, parts in over["llama_3_1_8b"]["state_bytes"].items():
        lines.append(f"- Llama-3.1-8B shapes, bf16, sparsity {s}: DART state {parts['total'] / 1e6:.2f} MB, no "
                     "weights copied")
    f = over["llama_3_1_8b"]["overhead_flops_no_retrace"]
    lines.append(f"- Llama-3.1-8B shapes: tracing + monitoring FLOPs = {100 * f['fraction']:.3f}% of dense for "
                 f"{meta['prompt_len']} + {meta['new_tokens']} tokens; each re-trace adds "
                 f"{100 * f['fraction_per_retrace']:.3f}% (the FLOPs of {f['retrace_in_dense_tokens']:.1f} dense "
                 "decode tokens)")
    lines.append(f"- KV cache read at the last token: {over['kv_cache_bytes_at_end'] / 1e6:.2f} MB (not in the "
                 "ceiling); compiled step: " + meta["compiled_step"]
                 + (f"; compiled neuron swaps: {meta['compiled_swap']}" if "compiled_swap" in meta else ""))
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1, default=float))
    md_path.write_text(markdown_table(result))
    return json_path, md_path
