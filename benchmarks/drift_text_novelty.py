"""A drift detector on the text itself: how many of a window's tokens the text just before it did not contain.

The detectors tried on the model's signals (attention output, mask fit, surprisal, entropy) do not tell a genre
switch from ordinary variation inside a text. This script asks whether the text tells them apart: per position t,
the novelty is the share of the last W tokens that are absent from the R tokens before them (a reference that
follows the text). It needs no model forward, so it is also a bound on what a cheap lexical detector could do.

Two views, on every drift sequence that `--split` selects:

- separation: for each switch, the highest novelty in the 64 tokens after the switch against the highest in the
  unchanged text before it (from the end of the prompt). Where the text after a switch is never more novel than
  the text before it already was, a detector on this signal cannot catch that switch without also firing inside
  unchanged text.
- detectors: fires when a window's novelty exceeds the mean of its reference windows by max(k standard
  deviations, floor). The reference is the last `fit` windows: at first those of the prompt (one per position,
  so they overlap more than the later ones), then the windows checked since, every 5 tokens (the benchmark's
  chunk), emptied at a trigger and refilled from the windows after it. At most one trigger per 64 tokens. Counted
  as the drift benchmark counts triggers.

    python benchmarks/drift_text_novelty.py --split tune --out benchmarks/results/drift/text_novelty_smollm2_tune.md
"""
from __future__ import annotations

import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune.benchmarks import Triggers, drift_parser, drift_setup, publish  # noqa: E402
from dartprune.evaluation.drift import DETECTION_WINDOW  # noqa: E402

CHUNK = 5          # tokens between checks, as the drift benchmark feeds them
COOLDOWN = 64      # tokens after a trigger before the next may fire


def novelty(ids: list[int], start: int, window: int, reference: int) -> dict[int, float]:
    """Per position t >= start + window - 1: the share of ids[t - window + 1 .. t] absent from the `reference`
    tokens before that window."""
    out = {}
    for t in range(start + window - 1, len(ids)):
        seen = set(ids[max(0, t - window - reference + 1):t - window + 1])
        out[t] = sum(token not in seen for token in ids[t - window + 1:t + 1]) / window
    return out


def separation(sequences: list, prefix: int, window: int, reference: int) -> list[float]:
    """Per switch: the highest novelty within DETECTION_WINDOW tokens after the switch over the highest before it
    (after the prompt)."""
    ratios = []
    for seq in sequences:
        if seq.kind != "switch":
            continue
        values = novelty(seq.ids, prefix, window, reference)
        before = max(v for t, v in values.items() if t <= seq.switch)
        after = max(v for t, v in values.items() if seq.switch < t <= seq.switch + DETECTION_WINDOW)
        ratios.append(after / before if before else float("inf"))
    return ratios


def simulate(sequences: list, prefix: int, window: int, reference: int, k: float, floor: float,
             fit: int) -> dict:
    """The detector described above, over every sequence."""
    triggers = Triggers()
    for seq in sequences:
        fitted = list(novelty(seq.ids[:prefix], window, window, reference).values())[-fit:]
        values = novelty(seq.ids, prefix, window, reference)
        last = -COOLDOWN - 1
        for t in range(prefix + CHUNK - 1, len(seq.ids), CHUNK):
            if t not in values:
                continue
            spread = statistics.pstdev(fitted) if len(fitted) > 1 else floor
            if values[t] > statistics.mean(fitted) + max(k * spread, floor) and t - last > COOLDOWN:
                triggers.fire(seq.kind, t, seq.switch)
                last, fitted = t, []
            fitted = (fitted + [values[t]])[-fit:]
        triggers.end(seq.kind, len(seq.ids) - prefix if seq.kind == "control" else seq.switch - prefix)
    return triggers.result()


def main() -> None:
    parser = drift_parser(__doc__.splitlines()[0])
    parser.add_argument("--windows", default="16,32")
    parser.add_argument("--references", default="128,256")
    args = parser.parse_args()
    _, sequences = drift_setup(args)
    windows = [int(w) for w in args.windows.split(",")]
    references = [int(r) for r in args.references.split(",")]
    switches = sum(s.kind == "switch" for s in sequences)
    lines = [f"# A drift detector on the text's own novelty ({args.split} split), {args.model}'s tokens", "",
             f"`{' '.join(sys.argv)}`", "",
             f"{switches} switch sequences and {len(sequences) - switches} controls; prefix {args.prefix}, segments "
             f"{args.segment}. Novelty at t: the share of the last W tokens absent from the R tokens before them.",
             "", "## Separation", "",
             f"Per switch, the highest novelty in the {DETECTION_WINDOW} tokens after it over the highest in the "
             "unchanged text before it.", "",
             "| W | R | switches whose after-switch peak is above the before-switch peak | ratios (sorted) |",
             "|---|---|---|---|"]
    for window, reference in itertools.product(windows, references):
        ratios = sorted(separation(sequences, args.prefix, window, reference))
        above = sum(r > 1 for r in ratios)
        lines.append(f"| {window} | {reference} | {above} of {len(ratios)} | "
                     f"{', '.join(f'{r:.2f}' for r in ratios)} |")
        print(lines[-1], flush=True)
    lines += ["", "## Detectors", "",
              f"| W | R | k | floor | fit windows | {Triggers.HEADER}", "|---|---|---|---|---|---|---|---|"]
    for window, reference, k, floor, fit in itertools.product(windows, references, (2, 3, 4), (0.1, 0.2, 0.3),
                                                               (16, 64)):
        result = simulate(sequences, args.prefix, window, reference, k, floor, fit)
        lines.append(f"| {window} | {reference} | {k} | {floor} | {fit} | {Triggers.cells(result)}")
        print(lines[-1], flush=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
