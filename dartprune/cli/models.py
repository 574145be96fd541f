"""`dartprune models`: the model aliases that work offline, where they come from, and how to install them."""
from __future__ import annotations

import argparse
from collections.abc import Callable
import sys

from dartprune.architectures import supported_model_types
from dartprune.models import list_models

COLUMNS = ("alias", "model", "source package", "size", "licence", "installed")


def register(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    p = add_parser("models", help="list model aliases and supported families")
    p.set_defaults(run=run)


def _rows() -> list[tuple[str, ...]]:
    rows = []
    for entry in list_models():
        size = f"{entry['size_bytes'] / 1e6:.0f} MB" if entry.get("size_bytes") else "-"
        rows.append((entry["name"], entry["description"], entry["package"], size, entry["licence"],
                     "yes" if entry["installed"] else f"no: {entry['install']}"))
    return rows


def run(args: argparse.Namespace) -> int:
    rows = _rows()
    families = "Supported model types: " + ", ".join(supported_model_types())
    if not sys.stdout.isatty():
        # plain, complete lines for pipes and files (`dartprune models | grep smollm2-135m`)
        print("\t".join(COLUMNS))
        for row in rows:
            print("\t".join(row))
        print(families)
        return 0
    from rich.console import Console
    from rich.table import Table
    table = Table(title="Model aliases (any Hugging Face id or local folder works too)")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(families)
    return 0
