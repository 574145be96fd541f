"""Architecture adapters: one small file per model family, found through a registry by `model_type`."""
from dartprune.architectures import gemma, gpt2, gpt_neox, llama, opt, phi3  # noqa: F401  (register adapters)
from dartprune.architectures.base import (
    ADAPTERS,
    Adapter,
    Decoder,
    DecoderLayer,
    FFNParts,
    UnsupportedModelError,
    get_adapter,
    register_adapter,
    supported_model_types,
)

__all__ = ["ADAPTERS", "Adapter", "Decoder", "DecoderLayer", "FFNParts", "UnsupportedModelError", "get_adapter", "register_adapter",
           "supported_model_types"]
