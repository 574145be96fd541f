"""`dartprune` command line: one module per subcommand, each adding its own parser."""
from __future__ import annotations

import argparse
import functools
import importlib
import sys

SUBCOMMANDS = ("generate", "chat", "serve", "models", "eval", "bench", "calibrate", "harness")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dartprune", allow_abbrev=False,
                                     description=__doc__.splitlines()[0].replace("`", ""))
    subparsers = parser.add_subparsers(dest="command", required=True)
    # no abbreviated options: `--prompt` must not silently become `--prompt-file`
    add_parser = functools.partial(subparsers.add_parser, allow_abbrev=False)
    for name in SUBCOMMANDS:
        importlib.import_module(f"dartprune.cli.{name}").register(add_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; user errors print one clear line and exit 2."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.passthrough_args = extra
    try:
        return args.run(args) or 0
    except (ValueError, RuntimeError, OSError) as err:      # OSError: a path that is missing, a folder, ...
        print(f"dartprune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
