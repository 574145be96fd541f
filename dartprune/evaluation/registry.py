"""Task registry in the lm-eval style: a name maps to a Task class; `dartprune eval --tasks a,b` looks them up."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from dartprune.evaluation.core import MethodSpec

TASK_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    TASK_REGISTRY[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    if name not in TASK_REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASK_REGISTRY)}")
    return TASK_REGISTRY[name]


@dataclass
class EvalSettings:
    """Everything one `dartprune eval` run needs; tasks read the fields that concern them."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    methods: list[str] = field(default_factory=lambda: ["dense", "dart", "static", "griffin", "random"])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7])
    tasks: list[str] = field(default_factory=lambda: ["ppl", "drift", "mc", "xsum", "topics"])
    out: str = "eval_out"
    limit: int | dict[str, int] | None = None  # one count for every task, or per task name
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # other DartConfig fields
    data_dir: str | None = None  # local data folder (else $DARTPRUNE_DATA, else the Hub); see docs/data.md
    text: str = "wikitext2"  # ppl: a text source (file, gutenberg:NAME, wikitext2, python:MODULE)
    prefix: int = 128  # ppl/drift: traced tokens before scoring starts
    ppl_window: int = 512  # ppl: tokens per window (prefix included)
    ppl_windows: int = 8  # ppl: number of windows (--limit overrides)
    drift_segment: int | None = None  # drift: tokens of A's continuation and of B (None: the profile's)
    drift_profile: str = "full"  # drift: "full" (7 genres, 256-token segments) or "quick" (3 genres, 24)
    drift_split: str = "all"  # drift: "all", "tune" (to choose settings on) or "test" (to report them on)
    drift_sources: dict[str, list[str]] | None = None  # drift: genre -> text sources instead of the built-in ones
    mc_sets: list[str] = field(default_factory=lambda: [
        "piqa", "arc_easy", "arc_challenge", "boolq", "copa", "openbookqa", "winogrande", "siqa", "commonsenseqa"])
    summary_files: dict[str, str] = field(default_factory=dict)  # xsum / cnn_dailymail: another jsonl, same layout
    topic_tokens: int = 128  # topics: greedy tokens generated per prompt
    chat: str = "auto"  # topics: "auto" (chat template when the tokenizer has one), "yes", "no"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    loop: str = "auto"  # "native" (dartprune's loop, Llama and Gemma families), "hf", or "auto"
    calibration: dict[str, str] = field(default_factory=dict)  # method -> calibration file (wanda-static, threshold)

    def limit_for(self, task: str) -> int | None:
        """Items for `task`: mc items per set, ppl windows, drift switch sequences, summaries, topic prompts."""
        if isinstance(self.limit, dict):
            return self.limit.get(task)
        return self.limit

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    """One (task, subtask, method, sparsity) measurement, with everything needed to read it (docs/algorithm.md §7)."""

    task: str
    subtask: str
    model: str
    dtype: str
    method: str
    sparsity: float
    metrics: dict[str, float]
    items: int
    prefix_length: float | str
    protocol: str
    versions: dict[str, str]
    config: dict[str, Any]
    engine: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Task(ABC):
    """A task prepares its data once (`prepare`), then `evaluate` runs it for one method spec through a `Session`;
    specs come dense first, so generation tasks can keep the dense outputs as a reference."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    primary: ClassVar[tuple[str, bool]] = ("", True)  # (metric, higher is better) for summary tables and plots
    protocol: ClassVar[str] = ""
    summary: ClassVar[tuple[str, ...]] = ()   # the metrics of the results' summary table (none: the primary one)
    summary_note: ClassVar[str] = ""          # a line under that table saying how to read them

    @classmethod
    def summary_subtask(cls, subtasks: list[str]) -> str:
        """The subtask whose metrics the summary shows ('*': each result's own, one row per method)."""
        return "*"

    def __init__(self, settings: EvalSettings, model, tokenizer, versions: dict[str, str]):
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        self.versions = versions
        self.details: list[dict] = []  # per-item outputs, written to details.jsonl

    @classmethod
    def check_data(cls, settings: EvalSettings) -> None:
        """Raise if the task's data cannot be had (called before the model loads: a run whose data is missing
        stops there); nothing to check by default."""

    def prepare(self) -> None:
        """Load and tokenise the data (honouring settings.limit)."""

    def sources(self) -> dict[str, str | None]:
        """The texts the prepared items come from, by name, with their sha256 where known (a calibrated method
        must not be evaluated on its calibration text); none by default."""
        return {}

    def comparisons(self) -> list[dict]:
        """Paired comparisons across the evaluated methods, once they all ran (none by default)."""
        return []

    def plot_traces(self, out) -> list:
        """Extra plots of the task's own (none by default)."""
        return []

    @abstractmethod
    def evaluate(self, spec: MethodSpec, session) -> list[Result]:
        """Score the prepared items with `spec`'s method, run by `session` (a `core.Session`)."""

    def result(self, spec: MethodSpec, subtask: str, metrics: dict[str, float], items: int,
               prefix_length: float | str, engine: dict[str, float], seconds: float, **extra: Any) -> Result:
        import dataclasses
        return Result(task=self.name, subtask=subtask, model=self.settings.model, dtype=self.settings.dtype,
                      method=spec.name, sparsity=spec.sparsity, metrics=metrics, items=items,
                      prefix_length=prefix_length, protocol=self.protocol, versions=self.versions,
                      config=dataclasses.asdict(spec.config), engine=engine, seconds=round(seconds, 3),
                      seed=self.settings.seed, extra=extra)
