"""Where the shared offline datasets are: one place, so the library, benchmarks and tests agree."""
from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """$DARTPRUNE_DATA, else shared/data beside the repository (where the project and CI lay it)."""
    env = os.environ.get("DARTPRUNE_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation data folder {path} not found; set DARTPRUNE_DATA to shared/data")
    return path


def gutenberg_path(name: str) -> Path:
    """A shared Gutenberg text by name, with or without `.txt`."""
    stem = name[:-4] if name.endswith(".txt") else name
    path = data_dir() / "gutenberg" / f"{stem}.txt"
    if not path.is_file():
        names = sorted(p.stem for p in (data_dir() / "gutenberg").glob("*.txt"))
        raise FileNotFoundError(f"no Gutenberg text {name!r}; available: {names}")
    return path
