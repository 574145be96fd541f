"""Drift detectors on the model's output instead of its attention: surprisal and predictive entropy.

Every decode step already computes the next-token distribution, so two per-token signals cost nothing extra: the
surprisal of the token that came (-log p, known when text is fed: a prompt, a new turn, a teacher-forced
benchmark) and the entropy of the distribution (known in free generation too). Both are recorded once per drift
sequence under DART's prompt mask with the monitor off; two detectors are then simulated over them, each fitted
on the prompt's tokens and refitted from the last `--refit` tokens after a trigger:

- level: the mean of a W-token window is more than k standard errors above the fitted mean;
- cusum: a one-sided CUSUM of the standardised signal, S = max(0, S + z - kappa), fires when S > h.

Two detectors combine the surprisal with the attention output that the engine's rules watch (recorded in the same
pass, at the paper rule's layer and at 30% of the depth):

- gated: the paper's rule (the engine's default settings) asks for a re-trace, which goes ahead only when the
  last 16 tokens' surprisal is more than g standard errors above its fitted mean (else the rule's pressure restarts);
- fused: per W-token window, a weighted sum of the surprisal's standard score and the drop of the window's cosine
  to the fitted tokens' mean direction (standardised by the fitted tokens' own windows, each against the others),
  fires above k.

False triggers and detection are counted as the drift benchmark counts them. The recorded signal does not
change after a simulated trigger (in the engine a re-trace would change the masks, and a little the signal).

    python benchmarks/drift_output_signals.py --model smollm2-135m --sparsity 0.5,0.7 --split tune \
        --out benchmarks/results/drift/output_signals_smollm2_tune.md
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune import DartConfig  # noqa: E402
from dartprune.benchmarks import (  # noqa: E402
    AttentionRecorder, Triggers, drift_parser, drift_setup, publish, teacher_force)
from dartprune.decode.model import NativeModel  # noqa: E402
from dartprune.engine import Engine  # noqa: E402
from dartprune.engine.config import monitored_layer_indices  # noqa: E402
from dartprune.engine.drift import make_detector  # noqa: E402

SIGNALS = ("surprisal", "entropy")
# value i of a signal is known once this many tokens have come: the surprisal of token i + 1 needs that token
KNOWN_AFTER = {"surprisal": 2, "entropy": 1}
PAPER = DartConfig(detector="paper", window=5, monitored_layers=(-1,), trigger_count=3, cooldown=4)
DEPTHS = {"last layer": -1, "30% depth": 0.3}        # where the attention output is recorded
GATE_TOKENS = 16


@dataclass
class Recording:
    kind: str
    switch: int
    signals: dict[str, torch.Tensor]   # name -> [tokens - 1]: value i is known after KNOWN_AFTER[name] + i tokens
    attention: dict[str, torch.Tensor]  # DEPTHS name -> [tokens, hidden], the attention output of each token


@torch.no_grad()
def record(model, sequences, prefix: int, sparsity: float, chunk: int) -> list[Recording]:
    """Per-token surprisal, entropy and attention output for every sequence under DART's prompt mask (no
    re-trace)."""
    count = model.config.num_hidden_layers
    layers = {name: monitored_layer_indices((depth,), count)[0] for name, depth in DEPTHS.items()}
    watched = sorted(set(layers.values()))
    config = DartConfig(sparsity=sparsity, detector="none", monitored_layers=tuple(watched))
    engine = Engine(model, config, widened=True)
    native = NativeModel(model, engine)
    recorder = AttentionRecorder(engine)
    out = []
    try:
        for seq in sequences:
            logp = torch.log_softmax(teacher_force(native, seq.ids, prefix, chunk).float(), dim=-1)
            surprisal = -logp.gather(1, torch.tensor(seq.ids[1:])[:, None]).squeeze(1)
            entropy = -(logp.exp() * logp).sum(-1)
            signals = recorder.take()
            attention = {name: signals[watched.index(layer)] for name, layer in layers.items()}
            out.append(Recording(seq.kind, seq.switch, {"surprisal": surprisal, "entropy": entropy}, attention))
    finally:
        engine.close()
    return out


def fit(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation (at least 1e-6) of two or more values."""
    return values.mean().item(), max(values.std().item(), 1e-6)


def window_cosines(tokens: torch.Tensor, window: int) -> tuple[torch.Tensor, float, float]:
    """The mean direction of `tokens` ([tokens, hidden]) and the mean and spread (at least 0.005) of its W-token
    windows' cosines, each window against the mean of the others."""
    count = tokens.shape[0] // window
    windows = tokens[:count * window].reshape(count, window, -1).mean(1)
    others = (windows.sum(0) - windows) / (count - 1)
    cosines = torch.nn.functional.cosine_similarity(windows, others, dim=-1)
    return tokens.mean(0), cosines.mean().item(), max(cosines.std().item(), 0.005)


def end(triggers: Triggers, rec: Recording, tokens: int, prefix: int) -> None:
    """The sequence of `tokens` tokens is over: count its unchanged tokens after the prefix."""
    triggers.end(rec.kind, tokens - prefix if rec.kind == "control" else rec.switch - prefix)


def simulate(recordings: list[Recording], signal: str, rule: str, params: dict, prefix: int, refit: int) -> dict:
    """One detector over every recording; a trigger refits the baseline from the last `refit` tokens."""
    triggers = Triggers()
    for rec in recordings:
        x = rec.signals[signal]
        values = x.tolist()
        offset = KNOWN_AFTER[signal]
        mean, std = fit(x[:prefix + 1 - offset])
        cusum, window = 0.0, []
        for index in range(prefix + 1 - offset, len(x)):
            position = index + offset
            z = (values[index] - mean) / std
            fired = False
            if rule == "cusum":
                cusum = max(0.0, cusum + z - params["kappa"])
                fired = cusum > params["h"]
            else:
                window.append(z)
                if len(window) == params["window"]:
                    fired = sum(window) / math.sqrt(len(window)) > params["k"]
                    window = []
            if fired:
                triggers.fire(rec.kind, position, rec.switch)
                mean, std = fit(x[max(0, index + 1 - refit):index + 1])
                cusum, window = 0.0, []
        end(triggers, rec, len(x) + 1, prefix)
    return triggers.result()


def surprisal_score(x: torch.Tensor, start: int, stop: int, mean: float, std: float) -> float:
    """Standard score of the mean surprisal of tokens start..stop-1 (positions), against the fitted mean."""
    values = x[start - 1:stop - 1]
    return float(((values - mean) / std).sum()) / math.sqrt(len(values))


def simulate_gated(recordings: list[Recording], gate: float | None, prefix: int, refit: int) -> dict:
    """The paper's rule on the last layer; a re-trace it asks for goes ahead when the surprisal of the last
    GATE_TOKENS tokens stands more than `gate` standard errors above its fitted mean (None: always)."""
    triggers = Triggers()
    for rec in recordings:
        x, attention = rec.signals["surprisal"], rec.attention["last layer"][None]
        detector = make_detector(PAPER)
        detector.fit(attention[:, :prefix])
        mean, std = fit(x[:prefix - 1])
        for start in range(prefix, attention.shape[1], PAPER.window):
            position = min(start + PAPER.window, attention.shape[1])
            if not detector.observe(attention[:, start:position], position):
                continue
            if gate is None or surprisal_score(x, position - GATE_TOKENS, position, mean, std) > gate:
                triggers.fire(rec.kind, position, rec.switch)
                detector.refit(attention[:, max(0, position - PAPER.ring_size):position])
                mean, std = fit(x[max(0, position - refit):position - 1])
            else:
                detector.pressure = 0
        end(triggers, rec, len(x) + 1, prefix)
    return triggers.result()


def simulate_fused(recordings: list[Recording], depth: str, weight: float, k: float, window: int, prefix: int,
                   refit: int) -> dict:
    """Per window: (weight * surprisal score + cosine-drop score) / norm > k; refitted from `refit` tokens."""
    triggers = Triggers()
    for rec in recordings:
        x, attention = rec.signals["surprisal"], rec.attention[depth]
        mean, std = fit(x[:prefix - 1])
        reference, level, spread = window_cosines(attention[:prefix], window)
        for start in range(prefix, attention.shape[0] - window + 1, window):
            position = start + window
            cosine = torch.nn.functional.cosine_similarity(attention[start:position].mean(0), reference, dim=0)
            drop = (level - float(cosine)) / spread
            score = (weight * surprisal_score(x, start, position, mean, std) + drop) / math.hypot(weight, 1.0)
            if score > k:
                triggers.fire(rec.kind, position, rec.switch)
                mean, std = fit(x[max(0, position - refit):position - 1])
                reference, level, spread = window_cosines(attention[max(0, position - refit):position], window)
        end(triggers, rec, len(x) + 1, prefix)
    return triggers.result()


GRID = {
    "level": [dict(window=w, k=k) for w, k in itertools.product((16, 32), (2.0, 3.0, 4.0, 5.0))],
    "cusum": [dict(kappa=kappa, h=h) for kappa, h in itertools.product((0.25, 0.5, 1.0), (5.0, 10.0, 20.0, 40.0))],
}
GATES = (None, 0.0, 1.0, 2.0, 3.0)
FUSED = list(itertools.product(DEPTHS, (1.0, 2.0), (2.0, 3.0, 4.0)))      # depth, surprisal weight, k


def main() -> None:
    parser = drift_parser(__doc__.splitlines()[0])
    parser.add_argument("--sparsity", default="0.5,0.7")
    parser.add_argument("--refit", type=int, default=64, help="tokens a baseline is refitted from after a trigger")
    args = parser.parse_args()
    if args.refit < 2 * 16 or args.prefix < 2 * 16:
        parser.error("--refit and --prefix must be at least 32 (two 16-token windows to fit from)")
    model, sequences = drift_setup(args)
    lines = [f"# Drift detectors on the output signals ({args.split} split), {args.model}", "",
             f"`{' '.join(sys.argv)}`", "",
             f"{sum(s.kind == 'switch' for s in sequences)} switch sequences and "
             f"{sum(s.kind == 'control' for s in sequences)} controls; prefix {args.prefix}, segments "
             f"{args.segment}; baselines refitted from the last {args.refit} tokens after a trigger. Goal: at most "
             "2 false triggers per 1,000 unchanged tokens and 90% of switches caught within 64 tokens.", ""]
    for sparsity in [float(s) for s in args.sparsity.split(",")]:
        started = time.perf_counter()
        recordings = record(model, sequences, args.prefix, sparsity, 16)
        lines += [f"## Sparsity {sparsity:g} (signals recorded in {time.perf_counter() - started:.0f} s)", "",
                  f"| signal | detector | settings | {Triggers.HEADER}",
                  "|---|---|---|---|---|---|"]
        for signal in SIGNALS:
            for rule, grid in GRID.items():
                for params in grid:
                    result = simulate(recordings, signal, rule, params, args.prefix, args.refit)
                    shown = ", ".join(f"{k}={v:g}" for k, v in params.items())
                    lines.append(f"| {signal} | {rule} | {shown} | {Triggers.cells(result)}")
                    print(lines[-1], flush=True)
        lines += ["", "Combined with the attention output:", "",
                  f"| detector | settings | {Triggers.HEADER}", "|---|---|---|---|---|"]
        for gate in GATES:
            result = simulate_gated(recordings, gate, args.prefix, args.refit)
            shown = "the rule alone" if gate is None else f"g={gate:g}"
            lines.append(f"| paper rule gated by surprisal | {shown} | {Triggers.cells(result)}")
            print(lines[-1], flush=True)
        for depth, weight, k in FUSED:
            result = simulate_fused(recordings, depth, weight, k, 16, args.prefix, args.refit)
            lines.append(f"| fused, window=16 | {depth}, surprisal weight={weight:g}, k={k:g} | "
                         f"{Triggers.cells(result)}")
            print(lines[-1], flush=True)
        lines.append("")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
