"""How well the prompt's mask fits the text before and after a switch, on the drift benchmark.

Every sequence runs under DART's prompt masks with the monitor off (the masks never change). For every later token
and layer, the FFN runs in full beside the pruned one and two measures of the mask's fit are kept: the share of the
activations' energy (sum of u^2) on the neurons the mask drops, and the relative error of the pruned FFN output
(|f_dense - f_pruned| / |f_dense|, f the down projection's output, before any norm that follows it). A detector built on this signal (a window's mean, averaged over the layers,
against the mean of the first two windows after the mask is built) is simulated like `drift_detectors.py`'s, for a
sweep of margins, alone and as a gate on the paper's rule (the default detector, on the attention output of the
last layer): a re-trace the rule asks for goes ahead only when the fit of the last tokens is worse than after the
build by the margin.

    python benchmarks/mask_fit.py --model smollm2-135m --sparsity 0.5,0.7 --out benchmarks/results/drift/mask_fit_smollm2.md
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune import DartConfig  # noqa: E402
from dartprune.benchmarks import Triggers, drift_parser, drift_setup, publish, teacher_force  # noqa: E402
from dartprune.decode.model import NativeModel  # noqa: E402
from dartprune.engine import Engine  # noqa: E402
from dartprune.engine.drift import make_detector  # noqa: E402
from dartprune.engine.weights import activations  # noqa: E402

WINDOW, BASELINE_WINDOWS, CHUNK, GATE = 16, 2, 16, 32
MARGINS = (0.05, 0.1, 0.2, 0.3, 0.5)
GATE_MARGINS = (0.0, 0.05, 0.1, 0.15, 0.2)


@torch.no_grad()
def record(model, sequences, prefix: int, sparsity: float) -> list[dict]:
    """Per sequence: [2, layers, later tokens] (dropped energy share, relative output error) under the prompt's
    masks, and the default monitor's signal (attention output of the last layer, prompt tokens included)."""
    engine = Engine(model, DartConfig(sparsity=sparsity, detector="none"), widened=True)
    native = NativeModel(model, engine, kernel=False)      # every pruned forward goes through `engine.ffn`
    captured: dict[int, list[torch.Tensor]] = {}
    attention: list[torch.Tensor] = []
    pruned_ffn, observe = engine.ffn, engine.observe_attention

    def watch(j: int, a: torch.Tensor) -> None:
        attention.append(a.reshape(-1, a.shape[-1]).float().clone())
        observe(j, a)

    def ffn(layer: int, x: torch.Tensor) -> torch.Tensor:
        y = pruned_ffn(layer, x)
        if not engine.runs_prefix:
            raise SystemExit("the fit is read off the compact path's prefixes: this model or setting does not run them")
        parts, k = engine.parts[layer], engine.keep_counts()[layer]   # the kept neurons are the first k positions
        u = activations(parts, x.reshape(-1, x.shape[-1])).float()
        energy = u.square()
        dropped = energy[:, k:].sum(-1) / energy.sum(-1).clamp_min(1e-30)
        down = parts.down.float()
        bias = parts.down_bias.float() if parts.down_bias is not None else None
        error = F.linear(u[:, k:], down[:, k:]).norm(dim=-1) / F.linear(u, down, bias).norm(dim=-1).clamp_min(1e-30)
        captured.setdefault(layer, []).append(torch.stack([dropped, error]))
        return y

    engine.ffn, engine.observe_attention = ffn, watch
    out = []
    try:
        for seq in sequences:
            captured.clear()
            attention.clear()
            teacher_force(native, seq.ids, prefix, CHUNK)
            signal = torch.stack([torch.cat(captured[layer], dim=1) for layer in sorted(captured)], dim=1)
            monitored = torch.cat(attention)[None]
            out.append({"kind": seq.kind, "switch": seq.switch - prefix, "signal": signal,
                        "traced": monitored[:, :prefix], "attention": monitored[:, prefix:]})
    finally:
        engine.close()
    return out


def _windows(values: torch.Tensor) -> torch.Tensor:
    n = values.shape[0] // WINDOW
    return values[:n * WINDOW].reshape(n, WINDOW).mean(dim=1)


def simulate(recordings: list[dict], measure: int, margin: float) -> dict:
    """Fire when a window's mean (over the layers) exceeds (1 + margin) x the mean of the first windows; after a
    trigger the baseline is refitted from the next windows, as a re-trace would refit it."""
    triggers = Triggers()
    for rec in recordings:
        series = _windows(rec["signal"][measure].mean(dim=0))
        baseline, start = None, 0
        for w in range(series.numel()):
            if w < start + BASELINE_WINDOWS:
                continue
            if baseline is None:
                baseline = float(series[start:start + BASELINE_WINDOWS].mean())
            if float(series[w]) > (1 + margin) * baseline:
                triggers.fire(rec["kind"], (w + 1) * WINDOW, rec["switch"])
                baseline, start = None, w + 1
        triggers.end(rec["kind"], _unchanged(rec))
    return triggers.result()


def simulate_gated(recordings: list[dict], margin: float | None, prefix: int) -> dict:
    """The paper's rule with the default settings on the recorded attention output; a re-trace it asks for goes
    ahead only when the dropped energy of the last GATE tokens exceeds (1 + margin) x its mean over the first
    BASELINE_WINDOWS windows after the build or the last re-trace (margin None: no gate). After a re-trace the
    rule is refitted from the last R tokens, as the engine does."""
    config = DartConfig()
    triggers = Triggers()
    for rec in recordings:
        detector = make_detector(config)
        detector.fit(rec["traced"])
        fit = rec["signal"][0].mean(dim=0)
        since = 0
        for start in range(0, rec["attention"].shape[1] - config.window + 1, config.window):
            end = start + config.window
            if not detector.observe(rec["attention"][:, start:end], prefix + end):
                continue
            baseline_end = since + BASELINE_WINDOWS * WINDOW
            if margin is not None and (end < baseline_end + GATE or float(fit[end - GATE:end].mean()) <= (
                    1 + margin) * float(fit[since:baseline_end].mean())):
                continue
            triggers.fire(rec["kind"], end, rec["switch"])
            history = torch.cat([rec["traced"], rec["attention"][:, :end]], dim=1)
            detector.refit(history[:, -config.ring_size:])
            since = end
        triggers.end(rec["kind"], _unchanged(rec))
    return triggers.result()


def _unchanged(rec: dict) -> int:
    """Tokens of unchanged text in a recording: all of a control's, a switch sequence's before the switch."""
    return rec["signal"].shape[-1] if rec["kind"] == "control" else rec["switch"]


def contrast(recordings: list[dict], measure: int) -> dict:
    """Per sequence, the measure's mean after the switch over its mean before (from the third window on); controls
    split at the same position."""
    ratios: dict[str, list[float]] = {"switch": [], "control": []}
    before, after = [], []
    for rec in recordings:
        series = rec["signal"][measure].mean(dim=0)
        s = rec["switch"]
        b, a = float(series[BASELINE_WINDOWS * WINDOW:s].mean()), float(series[s:].mean())
        ratios[rec["kind"]].append(a / b)
        if rec["kind"] == "switch":
            before.append(b)
            after.append(a)
    return {"switch": ratios["switch"], "control": ratios["control"], "before": statistics.median(before),
            "after": statistics.median(after)}


def main() -> None:
    parser = drift_parser(__doc__.splitlines()[0], threads=2)
    parser.add_argument("--sparsity", default="0.5,0.7")
    args = parser.parse_args()
    model, sequences = drift_setup(args)
    lines = [f"# How well the prompt's mask fits the text before and after a switch ({args.split} split), "
             f"{args.model}", "", f"`{' '.join(sys.argv)}`", "",
             f"{sum(s.kind == 'switch' for s in sequences)} switch sequences and "
             f"{sum(s.kind == 'control' for s in sequences)} controls; prefix {args.prefix} (traced, dense), then "
             f"segments of {args.segment} tokens in chunks of {CHUNK} under the prompt's masks (never re-traced). "
             "Per token and layer: the share of the FFN activations' energy (sum of u^2) on the dropped neurons, "
             "and the relative error of the pruned FFN output. Values are means over the layers; 'before' starts "
             f"at the third window of {WINDOW} tokens; ratios are per sequence (after the switch / before it; "
             "controls split at the same position), medians with [min, max].", ""]
    names = ("dropped energy share", "relative FFN output error")
    for sparsity in [float(s) for s in args.sparsity.split(",")]:
        started = time.perf_counter()
        recordings = record(model, sequences, args.prefix, sparsity)
        lines += [f"## Sparsity {sparsity:g} (recorded in {time.perf_counter() - started:.0f} s)", "",
                  "| measure | before the switch | after it | after / before, switches | after / before, controls |",
                  "|---|---|---|---|---|"]
        for measure, name in enumerate(names):
            c = contrast(recordings, measure)
            span = {k: f"{statistics.median(c[k]):.3f} [{min(c[k]):.3f}, {max(c[k]):.3f}]"
                    for k in ("switch", "control")}
            lines.append(f"| {name} | {c['before']:.3f} | {c['after']:.3f} | {span['switch']} | {span['control']} |")
        lines += ["", f"Detector on the fit (window {WINDOW}, baseline the first {BASELINE_WINDOWS} windows after a "
                  "build or re-trace; fires when a window exceeds the baseline by the margin):", "",
                  "| measure | margin | false per 1k tokens | detected within 64 |", "|---|---|---|---|"]
        for measure, name in enumerate(names):
            for margin in MARGINS:
                r = simulate(recordings, measure, margin)
                lines.append(f"| {name} | {margin:g} | {r['false_per_1k']:.2f} | {r['detected_64']:.2f} |")
        lines += ["", f"The paper's rule (default settings) gated by the fit (the dropped energy of the last {GATE} tokens "
                  "against its level after the build; margin None: the rule alone):", "",
                  "| margin | false per 1k tokens | detected within 64 |", "|---|---|---|"]
        for margin in (None, *GATE_MARGINS):
            r = simulate_gated(recordings, margin, args.prefix)
            lines.append(f"| {margin} | {r['false_per_1k']:.2f} | {r['detected_64']:.2f} |")
        lines.append("")
        print("\n".join(lines[-40:]), flush=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
