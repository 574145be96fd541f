"""Plots shared by the CLI and the evaluation: the drift monitor's window cosines over a sequence."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dartprune.engine.stats import SequenceStats  # noqa: E402


def check_image_path(path: str | Path) -> None:
    """Refuse, before any work, a file name whose extension matplotlib cannot write."""
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ValueError(f"cannot write a plot to {path}: use one of .{', .'.join(sorted(formats))}")


def plot_drift_trace(stats: SequenceStats, path: str | Path, title: str = "", switch_at: int | None = None) -> Path:
    """Window cosine vs position, the threshold in force, re-trace marks, and an optional topic-switch line."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    positions = [w.position for w in stats.windows]
    ax.plot(positions, [w.cosine for w in stats.windows], marker=".", lw=1, label="window cosine")
    ax.step(positions, [w.threshold for w in stats.windows], where="post", color="tab:orange", lw=1,
            label="threshold")
    for i, position in enumerate(stats.retrace_positions):
        ax.axvline(position, color="tab:red", ls="--", lw=0.8, label="re-trace" if i == 0 else None)
    if switch_at is not None:
        ax.axvline(switch_at, color="black", lw=1.5, label="text switch")
    ax.set_xlabel("token position")
    ax.set_ylabel("cos(window mean, reference)")
    count = stats.retrace_count
    ax.set_title(title or f"{stats.method} at sparsity {stats.sparsity:g}: {count} re-trace{'' if count == 1 else 's'}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
