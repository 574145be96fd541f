"""`dartprune models`: the model aliases that work offline, where they come from, and how to install them."""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from dartprune.architectures import supported_model_types
from dartprune.models import list_models


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list model aliases and supported families")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    table = Table(title="Model aliases (any Hugging Face id or local folder works too)")
    for column in ("alias", "model", "source package", "size", "licence", "installed"):
        table.add_column(column)
    for entry in list_models():
        size = f"{entry['size_bytes'] / 1e6:.0f} MB" if entry.get("size_bytes") else "-"
        table.add_row(entry["name"], entry["description"], entry["package"], size, entry["licence"],
                      "yes" if entry["installed"] else f"no: {entry['install']}")
    console = Console()
    console.print(table)
    console.print("Supported model types: " + ", ".join(supported_model_types()))
    return 0
