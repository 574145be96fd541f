"""The DART engine: tracing, budgets, masks, the pruned FFN, drift monitoring and re-tracing."""
from dartprune.engine.config import ConfigError, DartConfig
from dartprune.engine.handle import DartHandle, attach
from dartprune.engine.methods import METHOD_REGISTRY
from dartprune.engine.stats import SequenceStats

__all__ = ["ConfigError", "DartConfig", "DartHandle", "METHOD_REGISTRY", "SequenceStats", "attach"]
