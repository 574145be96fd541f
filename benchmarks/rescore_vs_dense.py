"""Re-score a finished evaluation's ROUGE-L against dense from its stored outputs, with the current rule.

Before commit (this script's), an output equal to dense's scored 0 against it when both were empty (ROUGE scores
two empty texts 0), while dense itself counts 1. The per-item outputs are in details.jsonl, so the fix needs no
model: each generation item's `rougeL_vs_dense` is recomputed with `rouge_vs_dense`, each result's mean with it,
and results.json, results.md, details.jsonl and the plots are written again. Nothing else changes.

    python benchmarks/rescore_vs_dense.py benchmarks/results/summaries_smollm2
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dartprune.evaluation.generation import rouge_vs_dense  # noqa: E402
from dartprune.evaluation.registry import Result  # noqa: E402
from dartprune.evaluation.report import markdown, plot_quality, write_details, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    saved = json.loads((args.folder / "results.json").read_text())
    details = [json.loads(line) for line in (args.folder / "details.jsonl").read_text().splitlines()]
    dense = {(d["task"], d["index"]): d["output"] for d in details if "output" in d and d["method"] == "dense"}
    scores: dict[tuple[str, str, float], list[float]] = {}
    changed = 0
    for d in details:
        if "output" not in d:                     # rows of the tasks that generate nothing (ppl, mc, drift)
            continue
        key = (d["task"], d["index"])
        if key not in dense or "rougeL_vs_dense" not in d["scores"]:
            continue
        new = 1.0 if d["method"] == "dense" else rouge_vs_dense(d["output"], dense[key])
        changed += new != d["scores"]["rougeL_vs_dense"]
        d["scores"]["rougeL_vs_dense"] = new
        scores.setdefault((d["task"], d["method"], d["sparsity"]), []).append(new)
    results = [Result(**r) for r in saved["results"]]
    for r in results:
        values = scores.get((r.task, r.method, r.sparsity))
        if values is not None:
            r.metrics["rougeL_vs_dense"] = sum(values) / len(values) if values else math.nan
    write_json(args.folder / "results.json", saved["meta"], results, saved["comparisons"])
    write_details(args.folder / "details.jsonl", details)
    plot_quality(results, args.folder)
    (args.folder / "results.md").write_text(markdown(saved["meta"], results, saved["comparisons"]) + "\n",
                                            encoding="utf-8")
    print(f"{args.folder}: {changed} item scores changed")


if __name__ == "__main__":
    main()
