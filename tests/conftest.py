"""Session fixtures: the real default model, loaded once (converted once into DARTPRUNE_CACHE)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never wait on the network


@pytest.fixture(scope="session")
def smollm2():
    from dartprune.models import load_model
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    return model, tokenizer
