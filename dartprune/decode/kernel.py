"""The compiled decode step (kernel.c): built once per machine with the system C compiler, cached, loaded with
ctypes; the native loop falls back to its PyTorch step where it cannot be built or does not apply.

Why: on a CPU a PyTorch op costs microseconds however small, a decode step of a 30-layer model runs hundreds of
them, and PyTorch's matrix-vector products reach about half the memory bandwidth on the CPUs measured here. The
kernel runs the whole step in one call and streams every weight at the speed of memory, so the time saved by
reading fewer FFN weights shows in the step time.

It is built for float32 weights and, separately, for bfloat16 ones (widened to float32 as they are read: half the
bytes of float32, where PyTorch's bfloat16 matmuls on a CPU without native bfloat16 are slower than its float32
ones). The build takes about a second each and is cached (`dartprune.compiled`); `DARTPRUNE_KERNEL=0` turns it off.
"""
from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

import torch

from dartprune.compiled import build

SOURCE = Path(__file__).with_name("kernel.c")
ACTIVATIONS = {"SiLUActivation": 0, "SiLU": 0, "GELUTanh": 1, "PytorchGELUTanh": 1, "GELUActivation": 2, "GELU": 2}
_P = ctypes.POINTER(ctypes.c_float)


class _Layer(ctypes.Structure):
    _fields_ = [(name, _P) for name in (
        "input_norm", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm",
        "post_attention_norm", "ffn_norm", "post_ffn_norm", "gate", "up", "up_bias", "down", "down_bias", "cos",
        "sin")] + [("window", ctypes.c_int), ("keep", ctypes.c_int), ("down_neuron_major", ctypes.c_int)]


class _Model(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_int) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim",
                                                   "intermediate", "vocab", "capacity", "act", "gated",
                                                   "max_threads")]
                + [(name, ctypes.c_float) for name in ("eps", "norm_offset", "attention_scale", "attention_softcap",
                                                       "final_softcap", "embed_scale")]
                + [(name, _P) for name in ("embed", "final_norm", "lm_head", "k_cache", "v_cache")]
                + [("layer", ctypes.POINTER(_Layer))]
                + [(name, _P) for name in ("x", "h", "a", "q", "kv", "attn", "u", "y", "scores", "partial")])


# the build of kernel.c for each weight dtype it runs (activations and the cache are float32 in both)
WEIGHT_DTYPES: dict[torch.dtype, tuple[str, ...]] = {torch.float32: (), torch.bfloat16: ("WEIGHT_BF16",)}
_LIBRARIES: dict[torch.dtype, ctypes.CDLL] = {}
_FAILED: dict[torch.dtype, str] = {}


def library(dtype: torch.dtype = torch.float32) -> ctypes.CDLL | None:
    """The compiled kernel for weights of `dtype`, building it on first use; None (with a warning, once) if it
    cannot be built."""
    if dtype in _LIBRARIES or dtype in _FAILED:
        return _LIBRARIES.get(dtype)
    if dtype not in WEIGHT_DTYPES:
        _FAILED[dtype] = f"no build for {dtype} weights (float32 and bfloat16 only)"
        return None
    lib = build(SOURCE, "step" if dtype == torch.float32 else f"step_{str(dtype).removeprefix('torch.')}",
                WEIGHT_DTYPES[dtype])
    if isinstance(lib, str):
        _FAILED[dtype] = lib
        if not lib.startswith("switched off"):
            warnings.warn(f"dartprune: the compiled decode step is unavailable ({lib}); using the PyTorch step",
                          stacklevel=2)
        return None
    lib.dart_scratch_floats.restype = ctypes.c_long
    lib.dart_scratch_floats.argtypes = [ctypes.POINTER(_Model)]
    lib.dart_bind_scratch.argtypes = [ctypes.POINTER(_Model), _P]
    lib.dart_max_tokens.restype = ctypes.c_long
    lib.dart_forward.restype = ctypes.c_int
    lib.dart_forward.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int,
                                 _P, _P, ctypes.POINTER(ctypes.c_int), ctypes.c_int, _P, ctypes.c_int]
    _LIBRARIES[dtype] = lib
    return lib


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    library(dtype)
    return _FAILED.get(dtype)


def _ptr(t: torch.Tensor | None):
    return ctypes.cast(t.data_ptr(), _P) if t is not None else None


def kernel_applies(native) -> str | None:
    """None when the kernel can run this native model's decode steps, else why not."""
    d = native.decoder
    if native.device.type != "cpu" or native.dtype not in WEIGHT_DTYPES:
        return "it runs float32 or bfloat16 weights on the CPU only"
    parts = native.parts[0]
    if type(parts.act).__name__ not in ACTIVATIONS:
        return f"activation {type(parts.act).__name__} is not compiled in"
    tensors = [d.final_norm, d.lm_head] + [t for layer in d.layers for t in (
        layer.input_norm, layer.q, layer.k, layer.v, layer.o, layer.ffn_norm)]
    tensors += [t for p in native.parts for t in (p.gate, p.up) if t is not None]
    if not all(t.is_contiguous() for t in tensors) or not d.embed.weight.is_contiguous():
        return "its weights are not contiguous row-major matrices"
    optional = [t for layer in d.layers for t in (layer.q_bias, layer.k_bias, layer.v_bias, layer.o_bias, layer.q_norm,
                                                  layer.k_norm, layer.post_attention_norm, layer.post_ffn_norm)]
    optional += [t for p in native.parts for t in (p.up_bias, p.down_bias)]
    every = tensors + [d.embed.weight] + [p.down for p in native.parts] + [t for t in optional if t is not None]
    if any(t.dtype != native.dtype for t in every):
        return f"its weights are not all {native.dtype}"
    if not all(p.down.is_contiguous() or p.down.t().is_contiguous() for p in native.parts):
        return "an FFN down projection is neither [hidden, I] nor [I, hidden] contiguous"
    return None


class KernelStep:
    """The compiled step bound to one `NativeModel` (its weights, cache and rotary tables by pointer)."""

    def __init__(self, native):
        self.lib = library(native.dtype)
        if self.lib is None:
            raise RuntimeError(unavailable_reason(native.dtype))
        self.native = native
        d = native.decoder
        self.model = _Model()
        m = self.model
        m.layers, m.hidden, m.heads, m.kv_heads, m.head_dim = (len(d.layers), d.lm_head.shape[1], d.heads, d.kv_heads,
                                                                d.head_dim)
        m.intermediate, m.vocab = native.parts[0].intermediate_size, d.lm_head.shape[0]
        m.act, m.gated = ACTIVATIONS[type(native.parts[0].act).__name__], int(native.parts[0].gated)
        m.eps, m.norm_offset, m.attention_scale = d.norm_eps, d.norm_offset, d.attention_scale
        m.attention_softcap = d.attention_softcap or 0.0
        m.final_softcap = d.final_softcap or 0.0
        m.embed_scale = native.embed_scale
        m.embed, m.final_norm, m.lm_head = _ptr(d.embed.weight), _ptr(d.final_norm), _ptr(d.lm_head)
        self.layers = (_Layer * len(d.layers))()
        for i, (layer, parts) in enumerate(zip(d.layers, native.parts)):
            target = self.layers[i]
            for name in ("input_norm", "q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "q_norm",
                         "k_norm", "post_attention_norm", "ffn_norm", "post_ffn_norm"):
                setattr(target, name, _ptr(getattr(layer, name)))
            target.gate, target.up, target.up_bias = _ptr(parts.gate), _ptr(parts.up), _ptr(parts.up_bias)
            target.down, target.down_bias = _ptr(parts.down), _ptr(parts.down_bias)
            target.down_neuron_major = int(not parts.down.is_contiguous())
            target.window = layer.window or 0
            target.keep = parts.intermediate_size
        m.layer = self.layers
        m.max_threads = max(1, os.cpu_count() or 1)
        self.max_tokens = int(self.lib.dart_max_tokens())
        self._bound = (None, None, None)
        self._keep: list[int] = []
        self._monitored: list[int] = []
        self._layer_ids = None

    def _bind(self) -> None:
        """(Re)point at the cache, the rotary tables and scratch sized for the cache's capacity."""
        native, m = self.native, self.model
        tables = native.rotary(native.cache.capacity)
        bound = (native.cache.k.data_ptr(), id(tables), native.cache.capacity)
        if bound == self._bound:
            return
        m.k_cache, m.v_cache, m.capacity = _ptr(native.cache.k), _ptr(native.cache.v), native.cache.capacity
        for i, layer in enumerate(native.decoder.layers):
            cos, sin = tables[layer.rope]
            self.layers[i].cos, self.layers[i].sin = _ptr(cos), _ptr(sin)
        self._tables = tables
        self.scratch = torch.zeros(self.lib.dart_scratch_floats(ctypes.byref(m)))
        self.lib.dart_bind_scratch(ctypes.byref(m), _ptr(self.scratch))
        self._bound = bound

    def run(self, tokens: list[int], start: int, keep: list[int], monitored: list[int], want_inputs: bool,
            threads: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Logits [T, vocab], FFN inputs [layers, T, hidden] (when wanted) and the monitored layers' attention
        outputs [len(monitored), T, hidden] of T <= max_tokens tokens at positions start.. (the cache must already
        hold room for them)."""
        count = len(tokens)
        if not (0 < start and start + count <= self.native.cache.capacity):
            raise ValueError(f"positions {start}..{start + count - 1} are outside the cache (capacity "
                             f"{self.native.cache.capacity})")
        if not 1 <= count <= self.max_tokens:
            raise ValueError(f"the compiled forward takes 1 to {self.max_tokens} tokens, not {count}")
        self._bind()
        if keep != self._keep:                       # the budgets change once per sequence
            for i, k in enumerate(keep):
                self.layers[i].keep = k
            self._keep = list(keep)
        m = self.model
        logits = torch.empty(count, m.vocab)
        inputs = torch.empty(m.layers, count, m.hidden) if want_inputs else None
        attention = torch.empty(len(monitored), count, m.hidden) if monitored else None
        if monitored != self._monitored:
            self._monitored, self._layer_ids = list(monitored), (ctypes.c_int * len(monitored))(*monitored)
        ids = (ctypes.c_int * count)(*tokens)
        status = self.lib.dart_forward(ctypes.byref(m), ids, count, start, _ptr(logits), _ptr(inputs),
                                       self._layer_ids if monitored else None, len(monitored), _ptr(attention),
                                       threads)
        if status != 0:
            raise RuntimeError("the compiled forward refused its arguments")
        return logits, inputs, attention
