"""The DART engine (per-sequence state and its step API), and `attach`, which drives it from a Hugging Face model."""
from dartprune.engine.attach import DartHandle, attach
from dartprune.engine.config import ConfigError, DartConfig
from dartprune.engine.engine import Engine, Step
from dartprune.engine.phase import Phase
from dartprune.engine.stats import SequenceStats

__all__ = ["ConfigError", "DartConfig", "DartHandle", "Engine", "Phase", "SequenceStats", "Step", "attach"]
