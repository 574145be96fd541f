"""dartprune: calibration-free, drift-aware FFN neuron pruning for faster decoding of Hugging Face LLMs."""
from dartprune.architectures import UnsupportedModelError, supported_model_types
from dartprune.engine import ConfigError, DartConfig, DartHandle, SequenceStats, attach

__version__ = "0.1.0"
__all__ = ["ConfigError", "DartConfig", "DartHandle", "SequenceStats", "UnsupportedModelError", "attach",
           "supported_model_types"]
