"""What every committed result records about how it was made: software versions, the source tree's git state and
the command line, with no machine paths in any of them."""
from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the numbers (optional ones when installed)."""
    import transformers

    import dartprune
    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "dartprune": dartprune.__version__}
    for name in ("lm-eval", "rouge-score", "datasets"):
        try:
            out[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_state() -> str:
    """`git describe --always --dirty` of the source tree, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would retype it: the program by its name (`dartprune`, not the path of the entry
    point in a virtual environment), arguments as given."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else "python"
    if program.endswith(".py"):
        module = Path(argv[0]).with_suffix("")
        parts = module.parts[module.parts.index("dartprune"):] if "dartprune" in module.parts else (module.name,)
        program = "python -m " + ".".join(parts)
    return " ".join([program, *(shlex.quote(a) for a in argv[1:])])
