"""Compare drift detectors offline on the drift benchmark's tune split.

The monitored signal (the attention output of every candidate's monitored layers, one vector per token) is
recorded once per sequence with DART's prompt masks fixed (a monitor that never fires); then every candidate
detector (a `DartConfig` with its detector settings) runs over the recorded signals: what it would flag before the
switch or in a control (false triggers per 1,000 tokens) and how soon after the switch it fires. After a trigger a
detector is refitted from the last R tokens, as the engine does; the signal it then sees is the recorded one (in
the engine a re-trace changes the masks, and so the signal, a little), so the figures after a first trigger are
approximate and the engine's own run on the benchmark is the final word.

    python benchmarks/drift_detectors.py --model smollm2-135m --sparsity 0.5,0.7 --out benchmarks/results/drift/detectors_smollm2.md
"""
from __future__ import annotations

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


@dataclass
class Recording:
    name: str
    kind: str
    switch: int
    prefix: torch.Tensor     # [layers, prefix tokens, hidden]: the traced tokens' signal
    stream: torch.Tensor     # [layers, later tokens, hidden]


@torch.no_grad()
def record(model, sequences, prefix: int, sparsity: float, layers: list[int], chunk: int) -> list[Recording]:
    """Signals of `layers` for every sequence under DART's prompt mask (the monitor never fires)."""
    config = DartConfig(sparsity=sparsity, detector="none", monitored_layers=tuple(layers))
    engine = Engine(model, config, widened=True)
    native = NativeModel(model, engine)
    recorder = AttentionRecorder(engine)
    out = []
    try:
        for seq in sequences:
            teacher_force(native, seq.ids, prefix, chunk)
            signal = torch.stack(recorder.take())
            out.append(Recording(seq.name, seq.kind, seq.switch, signal[:, :prefix], signal[:, prefix:]))
    finally:
        engine.close()
    return out


def simulate(recordings: list[Recording], config: DartConfig, rows: list[int], prefix: int) -> dict:
    """Run `config`'s detector over every recording (monitored layers = `rows` of the recorded ones); false
    triggers and detection as the benchmark counts them."""
    triggers = Triggers()
    for rec in recordings:
        detector = make_detector(config)
        detector.fit(rec.prefix[rows])
        position = prefix
        for start in range(0, rec.stream.shape[1], config.window):
            piece = rec.stream[rows, start:start + config.window]
            position += piece.shape[1]
            if detector.observe(piece, position):
                triggers.fire(rec.kind, position, rec.switch)
                history = torch.cat([rec.prefix[rows], rec.stream[rows, :start + piece.shape[1]]], dim=1)
                detector.refit(history[:, -config.ring_size:])
        triggers.end(rec.kind, rec.stream.shape[1] if rec.kind == "control" else rec.switch - prefix)
    return triggers.result()


PAPER = dict(detector="paper", window=5, monitored_layers=(-1,))   # the paper's rule on the last layer
SHIFT = dict(detector="shift", window=16, monitored_layers=(0.3,))  # the level-shift test, 30% of the depth
CANDIDATES: list[dict] = [
    {**PAPER, "trigger_count": 1, "cooldown": 0},                       # as published
    {**PAPER, "trigger_count": 3, "cooldown": 4},                       # with hysteresis (the default)
    dict(detector="paper", window=16, monitored_layers=(0.3,), trigger_count=2, cooldown=2),
    SHIFT,
    {**SHIFT, "shift_floor": 0.1},
    {**SHIFT, "shift_floor": 0.2},
    {**SHIFT, "shift_k": 3.5},
    {**SHIFT, "shift_persist": 1},
    {**SHIFT, "window": 8},
    {**SHIFT, "monitored_layers": (1.0,)},
    {**SHIFT, "monitored_layers": (0.3, 0.7)},
]


def main() -> None:
    parser = drift_parser(__doc__.splitlines()[0])
    parser.add_argument("--sparsity", default="0.5,0.7")
    args = parser.parse_args()
    model, sequences = drift_setup(args)
    lines = [f"# Drift detectors on the drift benchmark ({args.split} split), {args.model}", "",
             f"`{' '.join(sys.argv)}`", "",
             f"{sum(s.kind == 'switch' for s in sequences)} switch sequences and "
             f"{sum(s.kind == 'control' for s in sequences)} controls; prefix {args.prefix}, segments "
             f"{args.segment}. Signals recorded under DART's prompt mask; detectors simulated over them.", ""]
    count = model.config.num_hidden_layers
    wanted = [monitored_layer_indices(DartConfig(**c).monitored_layers, count) for c in CANDIDATES]
    layers = sorted({layer for w in wanted for layer in w})
    for sparsity in [float(s) for s in args.sparsity.split(",")]:
        started = time.perf_counter()
        recordings = record(model, sequences, args.prefix, sparsity, layers, 16)
        lines += [f"## Sparsity {sparsity:g} (signals recorded in {time.perf_counter() - started:.0f} s)", "",
                  f"| detector | settings | {Triggers.HEADER}",
                  "|---|---|---|---|---|"]
        for settings, want in zip(CANDIDATES, wanted):
            config = DartConfig(sparsity=sparsity, **settings)
            result = simulate(recordings, config, [layers.index(w) for w in want], args.prefix)
            shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "detector")
            lines.append(f"| {settings['detector']} | {shown} | {Triggers.cells(result)}")
            print(lines[-1], flush=True)
        lines.append("")
    publish(lines, args.out)


if __name__ == "__main__":
    main()
