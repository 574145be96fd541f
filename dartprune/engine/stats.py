"""What a run reports (docs/algorithm.md §6): re-traces, drift windows, budgets, executed sparsity, state bytes and
overhead FLOPs relative to the dense forward."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dartprune.engine.drift import WindowRecord


@dataclass
class RetraceRecord:
    """One re-trace: where its masks changed (tokens seen when the new neurons took over), what it cost, and
    where the monitor fired (earlier than `position` for the dense-steps re-trace, which traces first)."""

    position: int
    seconds: float
    neurons_changed: list[int]
    triggered_at: int | None = None

    def __post_init__(self) -> None:
        if self.triggered_at is None:
            self.triggered_at = self.position


@dataclass
class SequenceStats:
    """One sequence (batch row) of one run."""

    method: str
    sparsity: float
    tokens: int
    prompt_tokens: int
    keep_counts: list[int]
    intermediate_sizes: list[int]
    retraces: list[RetraceRecord] = field(default_factory=list)
    windows: list[WindowRecord] = field(default_factory=list)
    executed_sparsity: float = 0.0
    work_sparsity: float | None = None   # executed sparsity with re-trace scoring counted (None: no scoring)
    state_bytes: int = 0
    overhead_flops: dict[str, float] = field(default_factory=dict)
    dense_flops: float = 0.0
    retrace_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.work_sparsity is None:
            self.work_sparsity = self.executed_sparsity

    @property
    def retrace_count(self) -> int:
        return len(self.retraces)

    @property
    def retrace_positions(self) -> list[int]:
        return [r.position for r in self.retraces]

    @property
    def trigger_positions(self) -> list[int]:
        """Where the monitor fired for each re-trace (token count seen then)."""
        return [r.triggered_at for r in self.retraces]

    @property
    def layer_sparsity(self) -> list[float]:
        return [1 - k / size for k, size in zip(self.keep_counts, self.intermediate_sizes)]

    @property
    def overhead_fraction(self) -> float:
        """Tracing + monitoring + re-trace FLOPs over the dense forward FLOPs of the same tokens."""
        return sum(self.overhead_flops.values()) / self.dense_flops if self.dense_flops else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(retrace_count=self.retrace_count, retrace_positions=self.retrace_positions,
                   overhead_fraction=self.overhead_fraction, layer_sparsity=self.layer_sparsity)
        return out

    def summary(self) -> str:
        """One line for the end of a generation."""
        if self.method == "dense":
            return "dense (no pruning)"
        retraces = f"{self.retrace_count} re-trace{'' if self.retrace_count == 1 else 's'}"
        # below 0 where dense passes outweigh the pruned ones (prune_prefill's tracing pass on a short reply)
        more = " (more FFN work than dense)" if self.executed_sparsity < 0 else ""
        if self.work_sparsity < self.executed_sparsity - 5e-4:
            more += f", {self.work_sparsity:.1%} counting re-trace scoring"
        return (f"{self.method} at sparsity {self.sparsity:.2f} | executed {self.executed_sparsity:.1%}{more} | "
                f"{retraces} | state {self.state_bytes / 1e6:.2f} MB | "
                f"overhead {100 * self.overhead_fraction:.2g}% of dense FLOPs")
