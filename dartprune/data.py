"""Evaluation data: where it comes from (a local folder, else the Hugging Face Hub) and how each set maps to what
a task needs. The folder layout and the Hub names are documented in docs/data.md.

Every loader tries, in order: the folder given to it (`--data-dir`), the folder in `$DARTPRUNE_DATA`, then the
dataset's usual Hub name through `datasets` (unless the Hub is switched off with `HF_HUB_OFFLINE` /
`HF_DATASETS_OFFLINE`). When none works the error says both ways.

Multiple-choice items follow lm-eval's zero-shot conventions: a context, the choice texts, the label, and for each
choice the (context, continuation) pair that is scored; the continuation is " " + choice (lm-eval's target
delimiter); WinoGrande is partial scoring (the choices are contexts, the shared suffix is the continuation).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

DATA_ENV = "DARTPRUNE_DATA"
DOCS = "docs/data.md"


class DataNotFoundError(FileNotFoundError):
    """An evaluation set is neither in the local data folder nor reachable on the Hub."""


def data_dir(root: str | Path | None = None) -> Path | None:
    """The local data folder: `root` (from --data-dir), else $DARTPRUNE_DATA, else None. A folder that is named but
    missing is an error (a typo must not silently fall back to the Hub)."""
    named = root if root is not None else os.environ.get(DATA_ENV) or None
    if named is None:
        return None
    path = Path(named).expanduser()
    if not path.is_dir():
        source = "--data-dir" if root is not None else f"${DATA_ENV}"
        raise DataNotFoundError(f"{source} names {path}, which is not a folder (layout: {DOCS})")
    return path


def hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _not_found(what: str, local: str, hub: str | None, reason: str) -> DataNotFoundError:
    ways = [f"put it in a local data folder as {local} and pass --data-dir DIR (or set ${DATA_ENV})"]
    if hub:
        ways.append(f"let it load from the Hugging Face Hub ({hub}), which needs the network")
    return DataNotFoundError(f"{what} not found ({reason}). Either " + ", or ".join(ways) + f". See {DOCS}.")


def _local_file(root: str | Path | None, relative: str) -> Path | None:
    folder = data_dir(root)
    if folder is None:
        return None
    path = folder / relative
    return path if path.is_file() else None


def _hub_rows(what: str, local: str, path: str, name: str | None, split: str) -> list[dict]:
    """Rows of a Hub dataset split, or a DataNotFoundError naming both ways to get it."""
    hub = f"{path}{'/' + name if name else ''}, split {split}"
    if hub_offline():
        raise _not_found(what, local, hub, "no local data folder has it and the Hub is switched off "
                                           "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    try:
        import datasets
    except ImportError as err:
        raise _not_found(what, local, hub, "no local data folder has it and the `datasets` package is not "
                                           "installed (pip install 'dartprune[eval]')") from err
    try:
        return list(datasets.load_dataset(path, name, split=split))
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds (connection, not found, ...)
        raise _not_found(what, local, hub, f"no local data folder has it and the Hub failed: "
                                           f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from err


# ----------------------------------------------------------------------------------------------- texts
@dataclass(frozen=True)
class Text:
    """A long text for perplexity, drift and calibration. `name` identifies it in results (never a machine path)."""

    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


GUTENBERG = "gutenberg/{name}.txt"
BOOK_START = 2000  # characters the evaluation tasks skip at the start of a Gutenberg book (title page, contents)
WIKITEXT2 = "wikitext2/raw_v1_hf_nonempty_rows/wiki.test.raw"


def load_text(source: str | Path, root: str | Path | None = None) -> Text:
    """A text by source: a file path; `gutenberg:NAME` (a book of the local folder); `wikitext2` (WikiText-2 raw
    test, non-empty rows; local folder or Hub `Salesforce/wikitext`); or `python:MODULE` (the source of a module
    of Python's standard library, real code that every machine has)."""
    spec = str(source)
    if spec.startswith("gutenberg:"):
        name = spec.split(":", 1)[1].removesuffix(".txt")
        local = GUTENBERG.format(name=name)
        path = _local_file(root, local)
        if path is None:
            folder = data_dir(root)
            books = sorted(p.stem for p in (folder / "gutenberg").glob("*.txt")) if folder else []
            reason = "it is only read from a local folder" + (f", which has {', '.join(books)}" if books else "")
            raise _not_found(f"Gutenberg text {name!r}", local, None, reason)
        return Text(spec, path.read_text(encoding="utf-8", errors="replace"))
    if spec == "wikitext2":
        path = _local_file(root, WIKITEXT2)
        if path is not None:
            return Text(spec, path.read_text(encoding="utf-8"))
        rows = _hub_rows("WikiText-2", WIKITEXT2, "Salesforce/wikitext", "wikitext-2-raw-v1", "test")
        return Text(spec, "".join(r["text"] for r in rows if r["text"].strip()))
    if spec.startswith("python:"):
        import importlib.util
        module = spec.split(":", 1)[1]
        found = importlib.util.find_spec(module)
        if found is None or not found.origin or not found.origin.endswith(".py"):
            raise DataNotFoundError(f"{spec}: no pure-Python standard-library module {module!r}")
        return Text(spec, Path(found.origin).read_text(encoding="utf-8"))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"text {spec!r} is not a file, nor gutenberg:NAME, wikitext2 or python:MODULE "
                                f"(see {DOCS})")
    return Text(path.name, path.read_text(encoding="utf-8", errors="replace"))


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


def _piqa(i: int, d: dict) -> MCItem:
    return _cloze("piqa", i, f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))


def _arc(name: str) -> Callable[[int, dict], MCItem]:
    def item(i: int, d: dict) -> MCItem:
        q = d["question"]
        if isinstance(q, dict):   # the AI2 jsonl nests stem and choices; the Hub rows are flat
            stem, texts, labels = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
        else:
            stem, texts, labels = q, list(d["choices"]["text"]), list(d["choices"]["label"])
        return _cloze(name, i, f"Question: {stem}\nAnswer:", texts, labels.index(d["answerKey"]))
    return item


def _boolq(i: int, d: dict) -> MCItem:
    label = d["label"]
    positive = label.lower() == "true" if isinstance(label, str) else bool(label)
    return _cloze("boolq", i, f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(positive))


def _copa(i: int, d: dict) -> MCItem:
    connector = {"cause": " because", "effect": " therefore"}[d["question"]]
    premise = d["premise"].strip()
    context = (premise[:-1] if premise.endswith(".") else premise) + connector
    choices = [c[0].lower() + c[1:] for c in (d["choice1"], d["choice2"])]
    return _cloze("copa", i, context, choices, int(d["label"]))


def _openbookqa(i: int, d: dict) -> MCItem:
    choices = d["choices"]
    return _cloze("openbookqa", i, d["question_stem"], list(choices["text"]),
                  list(choices["label"]).index(d["answerKey"].strip()))


def _winogrande(i: int, d: dict) -> MCItem:
    sentence = d["sentence"]
    cut = sentence.index("_")
    options = [d["option1"], d["option2"]]
    suffix = " " + sentence[cut + 1:].strip()
    return MCItem("winogrande", i, options, int(d["answer"]) - 1, [(sentence[:cut] + o, suffix) for o in options])


def _siqa(i: int, d: dict) -> MCItem:
    options = [d["answerA"], d["answerB"], d["answerC"]]
    return _cloze("siqa", i, f"Q: {d['context']} {d['question']}\nA:", options, int(d["label"]) - 1)


def _commonsenseqa(i: int, d: dict) -> MCItem:
    q = d["question"]
    if isinstance(q, dict):
        stem, texts, labels = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    else:
        stem, texts, labels = q, list(d["choices"]["text"]), list(d["choices"]["label"])
    return _cloze("commonsenseqa", i, f"Question: {stem}\nAnswer:", texts, labels.index(d["answerKey"]))


# Local layouts: each reader returns rows in the Hub's field names, so one item function serves both sources.
def _read_piqa(folder: Path) -> list[dict]:
    docs, labels = _jsonl(folder / "piqa" / "valid.jsonl"), _labels(folder / "piqa" / "valid-labels.lst")
    return [{**d, "label": label} for d, label in _paired(docs, labels, folder / "piqa", "valid.jsonl",
                                                         "valid-labels.lst")]


def _read_openbookqa(folder: Path) -> list[dict]:
    rows = []
    with open(folder / "openbookqa" / "test.tsv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            parts = re.split(r"\(([ABCD])\) ", row["Choices"])
            rows.append({"question_stem": row["Question Stem"], "answerKey": row["Answer Key"],
                         "choices": {"label": parts[1::2], "text": [p.strip() for p in parts[2::2]]}})
    return rows


_WINO = re.compile(r"given sentence: (?P<sentence>.*)\n\nOption1: (?P<option1>.*) Option2: (?P<option2>.*) "
                   r"Answer format: option1/option2$", re.S)


def _read_winogrande(folder: Path) -> list[dict]:
    docs = json.loads((folder / "winogrande" / "test.json").read_text(encoding="utf-8"))
    labels = _labels(folder / "winogrande" / "dev-labels.lst")
    rows = []
    for i, (d, label) in enumerate(_paired(docs, labels, folder / "winogrande", "test.json", "dev-labels.lst")):
        m = _WINO.search(d["instruction"])
        if m is None:
            raise ValueError(f"WinoGrande item {i} does not match the documented instruction pattern")
        rows.append({"sentence": m["sentence"], "option1": m["option1"], "option2": m["option2"],
                     "answer": str(label)})
    return rows


def _read_siqa(folder: Path) -> list[dict]:
    docs, labels = _jsonl(folder / "siqa" / "dev.jsonl"), _labels(folder / "siqa" / "dev-labels.lst")
    return [{"context": d["context"], "question": d["question"], "answerA": d["options"][0],
             "answerB": d["options"][1], "answerC": d["options"][2], "label": str(label)}
            for d, label in _paired(docs, labels, folder / "siqa", "dev.jsonl", "dev-labels.lst")]


def _paired(docs: list, labels: list, folder: Path, doc_file: str, label_file: str) -> list[tuple]:
    """Items with their labels, one per line of each file; files of different lengths would shift every label."""
    if len(docs) != len(labels):
        raise ValueError(f"{folder}: {doc_file} holds {len(docs)} items but {label_file} {len(labels)} labels; "
                         "each item needs its label on the same line number")
    return list(zip(docs, labels))


@dataclass(frozen=True)
class MCSet:
    """Where one multiple-choice set lives locally and on the Hub, and how a row becomes an item."""

    local: str                                   # the file that marks the set as present in a data folder
    read: Callable[[Path], list[dict]]           # local folder -> rows with the Hub's field names
    hub: tuple[str, str | None, str]             # (path, config name, split)
    item: Callable[[int, dict], MCItem]


MC_SETS: dict[str, MCSet] = {
    "piqa": MCSet("piqa/valid.jsonl", _read_piqa, ("baber/piqa", None, "validation"), _piqa),
    "arc_easy": MCSet("arc/ARC-Easy-Test.jsonl", lambda f: _jsonl(f / "arc" / "ARC-Easy-Test.jsonl"),
                      ("allenai/ai2_arc", "ARC-Easy", "test"), _arc("arc_easy")),
    "arc_challenge": MCSet("arc/ARC-Challenge-Test.jsonl", lambda f: _jsonl(f / "arc" / "ARC-Challenge-Test.jsonl"),
                           ("allenai/ai2_arc", "ARC-Challenge", "test"), _arc("arc_challenge")),
    "boolq": MCSet("boolq/val.jsonl", lambda f: _jsonl(f / "boolq" / "val.jsonl"),
                   ("aps/super_glue", "boolq", "validation"), _boolq),
    "copa": MCSet("copa/val.jsonl", lambda f: _jsonl(f / "copa" / "val.jsonl"),
                  ("aps/super_glue", "copa", "validation"), _copa),
    "openbookqa": MCSet("openbookqa/test.tsv", _read_openbookqa, ("allenai/openbookqa", "main", "test"), _openbookqa),
    "winogrande": MCSet("winogrande/test.json", _read_winogrande,
                        ("allenai/winogrande", "winogrande_xl", "validation"), _winogrande),
    "siqa": MCSet("siqa/dev.jsonl", _read_siqa, ("lighteval/siqa", None, "validation"), _siqa),
    "commonsenseqa": MCSet("commonsenseqa/dev_rand_split.jsonl",
                           lambda f: _jsonl(f / "commonsenseqa" / "dev_rand_split.jsonl"),
                           ("tau/commonsense_qa", None, "validation"), _commonsenseqa),
}


def mc_items(name: str, rows: list[dict]) -> list[MCItem]:
    """Rows (Hub field names) of set `name` as items."""
    return [MC_SETS[name].item(i, row) for i, row in enumerate(rows)]


def load_mc(name: str, limit: int | None = None, root: str | Path | None = None) -> list[MCItem]:
    if name not in MC_SETS:
        raise ValueError(f"unknown multiple-choice set {name!r}; choose from {sorted(MC_SETS)}")
    spec = MC_SETS[name]
    folder = data_dir(root)
    if folder is not None and (folder / spec.local).is_file():
        rows = spec.read(folder)
    else:
        rows = _hub_rows(f"multiple-choice set {name!r}", spec.local, *spec.hub)
    items = mc_items(name, rows)
    return items[:limit] if limit is not None else items


# ----------------------------------------------------------------------------------------------- summarisation
SUMMARY_STOP = "###"


@dataclass(frozen=True)
class SummarySet:
    local: str
    hub: tuple[str, str | None, str]
    fields: tuple[str, str]        # Hub row: (document field, reference field)
    sentences: int
    max_tokens: int


SUMMARY_SETS: dict[str, SummarySet] = {
    "xsum": SummarySet("xsum_1shot/xsum_1shot.jsonl", ("EdinburghNLP/xsum", None, "test"), ("document", "summary"),
                       1, 64),
    "cnn_dailymail": SummarySet("cnn_dailymail_0shot/cnn_dailymail_0shot.jsonl",
                                ("abisee/cnn_dailymail", "3.0.0", "test"), ("article", "highlights"), 3, 128),
}


def summary_prompt(document: str, sentences: int) -> str:
    """The HELM layout the local files use: '###' framing, the article, then the instruction."""
    return f"###\nArticle: {document.strip()}\n\nSummarize the above article in {sentences} sentences."


def _stop_strings(stop: Any, path: Path) -> list[str]:
    """An item's `stop`: a list of strings (empty: none), or one string (not its characters); absent: the HELM
    files' '###'."""
    if stop is None:
        return [SUMMARY_STOP]
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"{path}: an item's stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def load_summaries(name: str, limit: int | None = None, root: str | Path | None = None,
                   path: str | Path | None = None) -> list[dict[str, Any]]:
    """Items {article (the whole prompt), summary_gt, max_tokens, stop} of a summarisation set; `path` reads another
    jsonl in the local layout."""
    spec = SUMMARY_SETS[name]
    local = Path(path) if path else _local_file(root, spec.local)
    if path and not local.is_file():
        raise DataNotFoundError(f"{path} not found")
    if local is not None:
        items = [{"article": d["article"], "summary_gt": d["summary_gt"], "max_tokens": int(d["max_tokens"]),
                  "stop": _stop_strings(d.get("stop"), local)} for d in _jsonl(local)]
    else:
        doc, ref = spec.fields
        rows = _hub_rows(f"summarisation set {name!r}", spec.local, *spec.hub)[:limit]
        items = [{"article": summary_prompt(r[doc], spec.sentences), "summary_gt": r[ref],
                  "max_tokens": spec.max_tokens, "stop": [SUMMARY_STOP]} for r in rows]
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
