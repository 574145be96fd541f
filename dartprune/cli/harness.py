"""`dartprune lm-eval ...`: lm-evaluation-harness's own command line with `--model dartprune` registered.

lm-eval discovers no models from other packages, so its `lm_eval` command cannot see dartprune's backend; this
subcommand imports the backend first and hands every argument to lm-eval unchanged."""
from __future__ import annotations

import argparse
from collections.abc import Callable


def register(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    p = add_parser(
        "lm-eval", help="run lm-evaluation-harness with --model dartprune available",
        description="Every argument goes to lm-eval, e.g. dartprune lm-eval --model dartprune --model_args "
                    "pretrained=smollm2-135m,method=dart,sparsity=0.5 --tasks piqa --limit 50",
        add_help=False)
    p.set_defaults(run=run, passthrough=True, passthrough_args=[])


def run(args: argparse.Namespace) -> int:
    try:
        from dartprune.evaluation import lm_eval_backend
    except ImportError as err:
        raise RuntimeError(f"lm-eval is not installed ({err}); pip install 'dartprune[eval]'") from err
    lm_eval_backend.main(args.passthrough_args)
    return 0
