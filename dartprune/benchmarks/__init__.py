"""Speed benchmark (`dartprune bench`) and what the standalone scripts in benchmarks/ share."""
from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], out: Path | None) -> None:
    """Print a script's markdown result and write it to `out` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text)
