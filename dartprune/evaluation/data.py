"""The offline evaluation data (../shared/data, see its README): loaders that map each set to what a task needs.

Multiple-choice items follow the data README's mapping exactly (lm-eval zero-shot conventions): a context, the
choice texts, the label, and for each choice the (context, continuation) pair that is scored. The continuation is
" " + choice (lm-eval's target delimiter); WinoGrande is partial scoring (the choices are contexts, the shared
suffix is the continuation).
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from dartprune.paths import data_dir


def read_text(path: str | Path, start: int = 0, chars: int | None = None) -> str:
    """A slice of a text file (characters), whitespace runs kept as they are."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return text[start:start + chars] if chars is not None else text[start:]


# ----------------------------------------------------------------------------------------------- multiple choice
@dataclass
class MCItem:
    """One multiple-choice item. `pairs[i]` = (context, continuation) scored for choice i."""

    dataset: str
    index: int
    choices: list[str]
    label: int
    pairs: list[tuple[str, str]]

    @property
    def shared_context(self) -> bool:
        return len({c for c, _ in self.pairs}) == 1


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def _cloze(dataset: str, index: int, context: str, choices: list[str], label: int) -> MCItem:
    return MCItem(dataset, index, choices, label, [(context, " " + c) for c in choices])


def _piqa(root: Path) -> list[MCItem]:
    docs, labels = _jsonl(root / "piqa" / "valid.jsonl"), _labels(root / "piqa" / "valid-labels.lst")
    return [_cloze("piqa", i, f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], labels[i])
            for i, d in enumerate(docs[:len(labels)])]


def _arc(root: Path, split: str, name: str) -> list[MCItem]:
    items = []
    for i, d in enumerate(_jsonl(root / "arc" / f"ARC-{split}-Test.jsonl")):
        q = d["question"]
        labels = [c["label"] for c in q["choices"]]
        items.append(_cloze(name, i, f"Question: {q['stem']}\nAnswer:", [c["text"] for c in q["choices"]],
                            labels.index(d["answerKey"])))
    return items


def _boolq(root: Path) -> list[MCItem]:
    return [_cloze("boolq", i, f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"],
                   1 if str(d["label"]).lower() == "true" else 0)
            for i, d in enumerate(_jsonl(root / "boolq" / "val.jsonl"))]


def _copa(root: Path) -> list[MCItem]:
    items = []
    for i, d in enumerate(_jsonl(root / "copa" / "val.jsonl")):
        connector = {"cause": " because", "effect": " therefore"}[d["question"]]
        premise = d["premise"].strip()
        context = (premise[:-1] if premise.endswith(".") else premise) + connector
        choices = [c[0].lower() + c[1:] for c in (d["choice1"], d["choice2"])]
        items.append(_cloze("copa", i, context, choices, int(d["label"])))
    return items


def _openbookqa(root: Path) -> list[MCItem]:
    items = []
    with open(root / "openbookqa" / "test.tsv", encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f, delimiter="\t")):
            parts = re.split(r"\(([ABCD])\) ", row["Choices"])
            texts = dict(zip(parts[1::2], (p.strip() for p in parts[2::2])))
            choices = [texts[k] for k in "ABCD"]
            items.append(_cloze("openbookqa", i, row["Question Stem"], choices,
                                "ABCD".index(row["Answer Key"].strip())))
    return items


_WINO = re.compile(r"given sentence: (?P<sentence>.*)\n\nOption1: (?P<option1>.*) Option2: (?P<option2>.*) "
                   r"Answer format: option1/option2$", re.S)


def _winogrande(root: Path) -> list[MCItem]:
    docs = json.loads((root / "winogrande" / "test.json").read_text(encoding="utf-8"))
    labels = _labels(root / "winogrande" / "dev-labels.lst")
    items = []
    for i, d in enumerate(docs[:len(labels)]):
        m = _WINO.search(d["instruction"])
        if m is None:
            raise ValueError(f"WinoGrande item {i} does not match the documented instruction pattern")
        sentence = m["sentence"]
        cut = sentence.index("_")
        options = [m["option1"], m["option2"]]
        suffix = " " + sentence[cut + 1:].strip()
        items.append(MCItem("winogrande", i, options, labels[i] - 1,
                            [(sentence[:cut] + opt, suffix) for opt in options]))
    return items


def _siqa(root: Path) -> list[MCItem]:
    docs, labels = _jsonl(root / "siqa" / "dev.jsonl"), _labels(root / "siqa" / "dev-labels.lst")
    return [_cloze("siqa", i, f"Q: {d['context']} {d['question']}\nA:", list(d["options"]), labels[i] - 1)
            for i, d in enumerate(docs[:len(labels)])]


def _commonsenseqa(root: Path) -> list[MCItem]:
    items = []
    for i, d in enumerate(_jsonl(root / "commonsenseqa" / "dev_rand_split.jsonl")):
        q = d["question"]
        items.append(_cloze("commonsenseqa", i, f"Question: {q['stem']}\nAnswer:", [c["text"] for c in q["choices"]],
                            "ABCDE".index(d["answerKey"])))
    return items


MC_DATASETS = {
    "piqa": _piqa,
    "arc_easy": lambda root: _arc(root, "Easy", "arc_easy"),
    "arc_challenge": lambda root: _arc(root, "Challenge", "arc_challenge"),
    "boolq": _boolq,
    "copa": _copa,
    "openbookqa": _openbookqa,
    "winogrande": _winogrande,
    "siqa": _siqa,
    "commonsenseqa": _commonsenseqa,
}


def load_mc(name: str, limit: int | None = None) -> list[MCItem]:
    if name not in MC_DATASETS:
        raise ValueError(f"unknown multiple-choice set {name!r}; choose from {sorted(MC_DATASETS)}")
    items = MC_DATASETS[name](data_dir())
    return items[:limit] if limit is not None else items


# ----------------------------------------------------------------------------------------------- generation
def load_xsum(limit: int | None = None, path: str | Path | None = None) -> list[dict]:
    items = _jsonl(Path(path) if path else data_dir() / "xsum_1shot" / "xsum_1shot.jsonl")
    return items[:limit] if limit is not None else items


# Two-topic prompts written for this project: the answer must move from one subject to another, which is where a
# mask traced from the prompt's first topic goes stale and DART's drift monitor should re-trace.
TOPIC_PROMPTS = [
    "Explain how photosynthesis works, then relate it to how solar panels work.",
    "Describe the rules of chess, then explain how a computer chess engine searches for moves.",
    "Summarise the causes of the French Revolution, then explain how a steam engine works.",
    "Explain how vaccines train the immune system, then describe how a bank decides to give someone a loan.",
    "Describe how bread is baked from flour and yeast, then explain how black holes form.",
    "Explain what a prime number is with examples, then write a short poem about the ocean.",
    "Describe the water cycle, then explain how the internet routes a message from one computer to another.",
    "Explain how a guitar produces sound, then describe the life cycle of a butterfly.",
]
