"""Drift detectors on the model's output instead of its attention: surprisal and predictive entropy.

Every decode step already computes the next-token distribution, so two per-token signals cost nothing extra: the
surprisal of the token that came (-log p, known when text is fed: a prompt, a new turn, a teacher-forced
benchmark) and the entropy of the distribution (known in free generation too). Both are recorded once per drift
sequence under DART's prompt mask with the monitor off; two detectors are then simulated over them, each fitted
on the prompt's tokens and refitted from the last `--refit` tokens after a trigger:

- level: the mean of a W-token window is more than k standard errors above the fitted mean;
- cusum: a one-sided CUSUM of the standardised signal, S = max(0, S + z - kappa), fires when S > h.

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
from dartprune.benchmarks import Triggers, drift_parser, drift_setup, publish  # noqa: E402
from dartprune.decode.model import NativeModel  # noqa: E402
from dartprune.engine import Engine  # noqa: E402

SIGNALS = ("surprisal", "entropy")


@dataclass
class Recording:
    kind: str
    switch: int
    signals: dict[str, torch.Tensor]   # name -> [tokens - 1], value at token index p = position p + 1


@torch.no_grad()
def record(model, sequences, prefix: int, sparsity: float, chunk: int) -> list[Recording]:
    """Per-token surprisal and entropy for every sequence under DART's prompt mask (no re-trace)."""
    engine = Engine(model, DartConfig(sparsity=sparsity, detector="none"))
    native = NativeModel(model, engine)
    out = []
    try:
        for seq in sequences:
            tokens = torch.tensor(seq.ids)
            native.reset()
            pieces = [native.forward(tokens[:prefix])]
            for start in range(prefix, len(tokens) - 1, chunk):
                pieces.append(native.forward(tokens[start:min(start + chunk, len(tokens) - 1)]))
            logp = torch.log_softmax(torch.cat(pieces).float(), dim=-1)       # predicts tokens[1:]
            surprisal = -logp.gather(1, tokens[1:, None]).squeeze(1)
            entropy = -(logp.exp() * logp).sum(-1)
            out.append(Recording(seq.kind, seq.switch, {"surprisal": surprisal, "entropy": entropy}))
    finally:
        engine.close()
    return out


def fit(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), max(values.std().item(), 1e-6)


def simulate(recordings: list[Recording], signal: str, rule: str, params: dict, prefix: int, refit: int) -> dict:
    """One detector over every recording; a trigger refits the baseline from the last `refit` tokens."""
    triggers = Triggers()
    for rec in recordings:
        x = rec.signals[signal]
        values = x.tolist()
        mean, std = fit(x[:prefix - 1])
        cusum, window = 0.0, []
        for index in range(prefix - 1, len(x)):
            position = index + 2                      # tokens seen once token index + 1 has come
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
        triggers.end(rec.kind, len(x) + 1 - prefix if rec.kind == "control" else rec.switch - prefix)
    return triggers.result()


GRID = {
    "level": [dict(window=w, k=k) for w, k in itertools.product((16, 32), (2.0, 3.0, 4.0, 5.0))],
    "cusum": [dict(kappa=kappa, h=h) for kappa, h in itertools.product((0.25, 0.5, 1.0), (5.0, 10.0, 20.0, 40.0))],
}


def main() -> None:
    parser = drift_parser(__doc__.splitlines()[0])
    parser.add_argument("--sparsity", default="0.5,0.7")
    parser.add_argument("--refit", type=int, default=64, help="tokens a baseline is refitted from after a trigger")
    args = parser.parse_args()
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
        lines.append("")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
