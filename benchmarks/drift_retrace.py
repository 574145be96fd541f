"""What a re-trace is worth, separated from detection: re-traces forced at known positions of the drift benchmark.

For each setting the sequences are scored teacher-forced in chunks of W tokens (as `dartprune eval --tasks drift`)
with the monitor switched off, and a re-trace forced:
- `oracle`: once, `delay` tokens after the switch (controls: at the same position), from the ring buffer;
- `periodic`: every `period` tokens after the prompt.
Perplexity after the switch, before it and on the controls are compared with static (no re-trace) and dense,
paired over the sequences. This says how much of static's gap to dense a re-trace can recover when it comes at
the right moment, how that depends on the ring size and the blend with the old scores, and whether re-tracing
inside an unchanged text costs anything.

    python benchmarks/drift_retrace.py --model smollm2-135m --sparsity 0.5 --split tune --out benchmarks/results/drift/retrace_smollm2_0.5.md
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune import DartConfig  # noqa: E402
from dartprune.benchmarks import drift_parser, drift_setup, publish  # noqa: E402
from dartprune.decode.model import NativeModel  # noqa: E402
from dartprune.engine import Engine  # noqa: E402
from dartprune.evaluation.intervals import bootstrap, gap_recovered, ratio_of_geomeans  # noqa: E402
from dartprune.evaluation.report import interval_text  # noqa: E402


@torch.inference_mode()
def score(model, sequences, prefix: int, config: DartConfig | None, retrace_at) -> list[dict]:
    """Per sequence: mean NLL before and after the switch (or over a control). `retrace_at(seq)` gives the
    positions (tokens fed) after which a re-trace is forced."""
    engine = Engine(model, config, widened=True) if config is not None else None
    native = NativeModel(model, engine)
    rows = []
    try:
        for seq in sequences:
            ids = torch.tensor(seq.ids)
            native.reset()
            native.forward(ids[:prefix])
            marks = sorted(retrace_at(seq)) if engine is not None else []
            logps = []
            window = (config or DartConfig()).window
            start = prefix
            while start < len(seq.ids) - 1:
                end = min(start + window, len(seq.ids) - 1)
                if marks and marks[0] < end:                  # stop the chunk at the re-trace position
                    end = max(marks[0], start + 1)
                logits = native.forward(ids[start:end])
                logps.append(logits.float().log_softmax(-1).gather(1, ids[start + 1:end + 1, None])[:, 0])
                start = end
                while marks and marks[0] <= start:
                    marks.pop(0)
                    engine.retrace(0)
            nll = -torch.cat(logps).double()
            split = seq.switch - (prefix + 1)
            rows.append({"kind": seq.kind, "before": float(nll[:split].mean()), "after": float(nll[split:].mean()),
                         "all": float(nll.mean())})
    finally:
        if engine is not None:
            engine.close()
    return rows


def main() -> None:
    parser = drift_parser(__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--oracle", default="16:0,16:0.3,64:0,64:0.3",
                        help="oracle settings as RING:BLEND, comma-separated")
    parser.add_argument("--periodic", default="64:64", help="periodic settings as PERIOD:RING ('' for none)")
    args = parser.parse_args()
    model, sequences = drift_setup(args)
    base = dict(sparsity=args.sparsity, detector="none")
    settings = [("dense", None, lambda s: []),
                ("static", DartConfig(method="static", sparsity=args.sparsity), lambda s: [])]
    for item in filter(None, args.oracle.split(",")):
        ring_text, blend_text = item.split(":")
        ring, blend = int(ring_text), float(blend_text)
        settings.append((f"oracle R={ring} blend={blend}", DartConfig(ring_size=ring, retrace_blend=blend, **base),
                         lambda s, r=ring: [s.switch + r]))
    for item in filter(None, args.periodic.split(",")):
        period, ring = (int(v) for v in item.split(":"))
        settings.append((f"periodic every {period}, R={ring} blend=0.3",
                         DartConfig(ring_size=ring, retrace_blend=0.3, **base),
                         lambda s, p=period: list(range(args.prefix + p, len(s.ids), p))))
    results = {}
    lines = [f"# Forced re-traces on the drift benchmark ({args.split} split), {args.model} at sparsity "
             f"{args.sparsity:g}", "", f"`{' '.join(sys.argv)}`", "",
             f"{sum(s.kind == 'switch' for s in sequences)} switch sequences, "
             f"{sum(s.kind == 'control' for s in sequences)} controls; prefix {args.prefix}, segments {args.segment}, "
             f"chunks of W = {DartConfig().window}. Perplexities are geometric means over sequences; ratios and gap "
             "recovered are paired against static with 95% bootstrap intervals.", "",
             "| setting | ppl after switch | ppl before | ppl controls | after: ratio vs static | after: gap recovered "
             "| controls: ratio vs static | s |", "|---|---|---|---|---|---|---|---|"]
    for name, config, marks in settings:
        started = time.perf_counter()
        results[name] = score(model, sequences, args.prefix, config, marks)
        rows = results[name]
        sw = [r for r in rows if r["kind"] == "switch"]
        ct = [r for r in rows if r["kind"] == "control"]
        line = (f"| {name} | {math.exp(sum(r['after'] for r in sw) / len(sw)):.1f} | "
                f"{math.exp(sum(r['before'] for r in sw) / len(sw)):.1f} | "
                f"{math.exp(sum(r['all'] for r in ct) / len(ct)):.1f} | ")
        if name not in ("dense", "static"):
            st, dn = results["static"], results["dense"]
            ratio = bootstrap([[r["after"] for r in sw], [r["after"] for r in st if r["kind"] == "switch"]],
                              ratio_of_geomeans)
            gap = bootstrap([[r["after"] for r in sw], [r["after"] for r in st if r["kind"] == "switch"],
                             [r["after"] for r in dn if r["kind"] == "switch"]], gap_recovered)
            control = bootstrap([[r["all"] for r in ct], [r["all"] for r in st if r["kind"] == "control"]],
                                ratio_of_geomeans)
            line += " | ".join(interval_text(v) for v in (ratio, gap, control))
        else:
            line += "- | - | -"
        lines.append(line + f" | {time.perf_counter() - started:.0f} |")
        print(lines[-1], flush=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
