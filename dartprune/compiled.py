"""Small C sources that dartprune builds once per machine with the system C compiler, caches and loads with ctypes.

Two use it: the native loop's decode step (`decode/kernel.c`) and the engine's in-place neuron swaps
(`engine/swap.c`). Each caller falls back to PyTorch where its library cannot be built.

A library is cached under `$DARTPRUNE_CACHE/kernels` (default `~/.cache/dartprune/kernels`), keyed by its source,
the compiler and the CPU's flags (it is built with `-march=native`). `DARTPRUNE_KERNEL=0` turns compiled code off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux's /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def _cpu_signature() -> str:
    return " ".join(sorted(cpu_flags())) or platform.processor()


def cache_dir() -> Path:
    from dartprune.models import cache_dir as root       # one place reads DARTPRUNE_CACHE
    return root() / "kernels"


def build(source: Path, name: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL | str:
    """The library built from `source` with the preprocessor `defines` (from the cache when it is there), or why it
    cannot be had: a compiler that does not run, a cache folder that cannot be written or a library that cannot be
    loaded is a reason to fall back, never an error."""
    if os.environ.get("DARTPRUNE_KERNEL", "1") == "0":
        return "switched off by DARTPRUNE_KERNEL=0"
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if compiler is None:
        return "no C compiler found (install gcc)"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        flags = FLAGS + [f"-D{define}" for define in defines]
        key = hashlib.sha256("\n".join([source.read_text(), compiler, version, " ".join(flags),
                                        _cpu_signature()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"dartprune_{name}_{key}.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
                    return f"{compiler} failed: {last}"
                os.replace(built, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        return f"{type(error).__name__}: {error}"
