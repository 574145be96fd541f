"""dartprune's own forward for Llama- and Gemma-family decoders: a preallocated KV cache and the fewest ops a
step needs, driving the engine directly (no hooks).

`NativeModel.forward(ids, start)` runs any number of tokens from position `start` (the prompt, a teacher-forced
chunk, a new conversation turn); a decode step is the same call with one token, or the compiled kernel of
`dartprune.decode.kernel` when it is available. The model's own parameters are read in place: nothing is copied,
and an attached engine's in-place permutation of the FFN neurons is seen as it happens.

Attention runs in float32 whatever the model's dtype. On a CPU everything does: a bfloat16 or float16 model's
weights are widened to float32 as each product reads them, a block at a time (`linear`; PyTorch's
reduced-precision matmuls on a CPU without native support are several times slower than its float32 ones: a
256-token prompt of SmolLM2 in bfloat16 took 3.9 s against 0.5 s in float32), so such a model computes what its
float32 copy computes (up to the summation order of a product widened in blocks), and the compiled step, which
reads bfloat16 weights the same way, agrees with it. The equivalence with Hugging Face's forward is tested in
float32 and against the float32 copy of a bfloat16 model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dartprune.architectures import Decoder, DecoderLayer, FFNParts, get_adapter
from dartprune.decode.kernel import KernelStep, kernel_applies, library
from dartprune.engine import Engine
from dartprune.engine.weights import activations, linear
from dartprune.methods import METHODS


def native_supported(model: nn.Module) -> bool:
    """Whether the native loop runs this model (else Hugging Face `generate` does): a Llama- or Gemma-family
    decoder with every weight in memory (not offloaded by a device map)."""
    try:
        decoder = get_adapter(model).decoder()
    except ValueError:
        return False
    return decoder is not None and all(p.device.type != "meta" for p in model.parameters())


def native_runs(method: str) -> bool:
    """Whether the native loop runs this method: it prunes with one kept set per layer (per-token methods run on
    Hugging Face `generate`)."""
    return METHODS[method].execution == "kept-set"


class KVCache:
    """Keys and values of every layer, [layers, kv_heads, capacity, head_dim] float32, grown by doubling."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, device: torch.device | str):
        self.k = torch.zeros(layers, kv_heads, capacity, head_dim, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def ensure(self, length: int) -> None:
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, :old.shape[2]] = old
            setattr(self, name, new)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """Hugging Face's RMSNorm of the Llama (offset 0, `w * x`) and Gemma (offset 1, `(1 + w) * x`) families."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in Hugging Face's half-split layout (the prompt's forward and the graph step)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class NativeModel:
    """One Hugging Face decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3) run by dartprune's forward, batch 1.

    engine: an `Engine` built on the same model, or None to run it dense."""

    def __init__(self, model: nn.Module, engine: Engine | None = None, capacity: int = 256, kernel: bool = True):
        adapter = get_adapter(model)
        decoder = adapter.decoder()
        if not native_supported(model):
            raise ValueError(f"the native decode loop runs Llama- and Gemma-family models held in memory, not this "
                             f"{model.config.model_type!r} model; use Hugging Face generate (`--loop hf`)")
        if engine is not None and engine.model is not model:
            raise ValueError("the engine must be built on the same model")
        self.model = model
        self.decoder: Decoder = decoder
        # the engine's view of the FFNs when it prunes (it may lay the down projections out neuron-major): a
        # native model lives inside its engine's lifetime
        self.parts: list[FFNParts] = engine.parts if engine is not None else [adapter.ffn_parts(layer)
                                                                                 for layer in adapter.layers()]
        self.engine = engine
        self.device = decoder.lm_head.device
        self.dtype = decoder.lm_head.dtype
        reduced = self.dtype in (torch.bfloat16, torch.float16)
        self.compute = torch.float32 if self.device.type == "cpu" and reduced else self.dtype  # activations (above)
        # Gemma's embedding scale (1 elsewhere), applied in float32 where the model is stored narrower
        self.embed_scale = float(getattr(decoder.embed, "embed_scale", 1.0))
        self.cache = KVCache(len(decoder.layers), decoder.kv_heads, decoder.head_dim, capacity, self.device)
        self._rotary: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rotary_length = 0
        self._windows = {layer.window for layer in decoder.layers}      # None: full causal attention
        self.monitored = {layer: j for j, layer in enumerate(engine.monitored)} if engine is not None else {}
        self.kernel = None
        if kernel and kernel_applies(self) is None and library(self.dtype) is not None:
            self.kernel = KernelStep(self)

    # ----------------------------------------------------------------- sequence
    def reset(self) -> None:
        """Forget the sequence: the next forward starts a new one at position 0."""
        self.cache.length = 0

    def reserve(self, length: int) -> None:
        """Room for `length` positions in the cache and the rotary tables now, so that no decode step pays for
        growing them (a copy of the whole cache) on the way."""
        self.cache.ensure(length)
        self.rotary(length)

    def rotary(self, end: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The rotary tables for positions [0, end), computed once per length bucket."""
        if end > self._rotary_length:
            length = max(end, 2 * self._rotary_length, 256)
            self._rotary = self.decoder.rotary(torch.arange(length, device=self.device))
            self._rotary_length = length
        return self._rotary

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, new_turn: bool = False, last_only: bool = False) -> torch.Tensor:
        """Logits [tokens, vocab] (float32) of `ids` ([tokens]) fed at the end of the sequence so far; at position
        0 they start a new sequence (the engine traces them as a prompt). new_turn: the tokens are a new turn of a
        conversation (traced like a prompt, masks updated). last_only: logits of the last token only ([1, vocab]),
        all that generation needs (the output projection over every prompt token is about a fifth of a 256-token
        prompt's FLOPs on SmolLM2)."""
        ids = ids.reshape(-1).to(self.device)
        tokens, start = ids.numel(), self.cache.length
        self.cache.ensure(start + tokens)
        engine = self.engine
        step = None
        if engine is not None:
            valid = torch.ones(1, tokens, dtype=torch.bool)
            if start == 0:
                engine.start(1)
                if engine.prunes_prompt(valid):        # trace the prompt dense (or not at all), then run it pruned
                    if engine.traces_prompt:
                        self._layers(ids, start, engine.begin_forward(valid, trace_only=True))
                        engine.end_forward()
                    else:
                        engine.build_untraced()
                    step = engine.begin_forward(valid, replay=True)
            elif new_turn:
                engine.new_turn()
            if step is None:
                step = engine.begin_forward(valid)
        if self.kernel is not None and tokens <= self.kernel.max_tokens and start > 0 and (
                step is None or not engine.prunes or (not step.dense and engine.runs_prefix)):
            logits = self._kernel_forward(ids.tolist(), start, step)
            return logits[-1:] if last_only else logits
        x = self._layers(ids, start, step)
        self.cache.length = start + tokens
        if last_only:
            x = x[-1:]
        d = self.decoder
        logits = linear(rms_norm(x, d.final_norm, d.norm_eps, d.norm_offset), d.lm_head).float()
        if d.final_softcap is not None:
            logits = torch.tanh(logits / d.final_softcap) * d.final_softcap
        if engine is not None:
            engine.end_forward()
        return logits

    def _layers(self, ids: torch.Tensor, start: int, step) -> torch.Tensor:
        """The decoder layers over `ids` at positions from `start` (their keys and values written to the cache):
        the final hidden states [tokens, hidden], before the last norm."""
        d, engine, tokens = self.decoder, self.engine, ids.numel()
        tables = self.rotary(start + tokens)
        # attention masks of this forward, one per window, shared by the layers (one token needs none unless windowed)
        masks = {window: self._mask(start, tokens, window) for window in self._windows
                 if tokens > 1 or window is not None}
        x = self._embed(ids)                                                 # [T, H]
        for i, layer in enumerate(d.layers):
            cos, sin = (t[start:start + tokens] for t in tables[layer.rope])
            a = self._attention(i, layer, rms_norm(x, layer.input_norm, d.norm_eps, d.norm_offset), cos, sin, start,
                                masks.get(layer.window))
            if step is not None and i in self.monitored and step.monitor:
                engine.observe_attention(self.monitored[i], a[None])
            if layer.post_attention_norm is not None:
                a = rms_norm(a, layer.post_attention_norm, d.norm_eps, d.norm_offset)
            x = x + a
            h = rms_norm(x, layer.ffn_norm, d.norm_eps, d.norm_offset)
            if step is None or step.dense:
                y = self._dense_ffn(i, h, x, layer, step)
            else:
                y = engine.ffn(i, h)
                if layer.post_ffn_norm is not None:
                    y = rms_norm(y, layer.post_ffn_norm, d.norm_eps, d.norm_offset)
            x = x + y
        return x

    def _kernel_forward(self, tokens: list[int], start: int, step) -> torch.Tensor:
        """A few tokens through the compiled forward; the engine gets what it would from the PyTorch one."""
        engine = self.engine
        keep = engine.keep_counts() if engine is not None else [p.intermediate_size for p in self.parts]
        monitored = list(engine.monitored) if step is not None and step.monitor else []
        logits, inputs, attention = self.kernel.run(tokens, start, keep, monitored,
                                                    engine is not None and engine.keeps_ring, torch.get_num_threads())
        self.cache.length = start + len(tokens)
        if engine is not None:
            if inputs is not None:
                engine.record_inputs(inputs[:, None])
            for j in range(len(monitored)):
                engine.observe_attention(j, attention[j][None])
            engine.end_forward()
        return logits

    def _dense_ffn(self, i: int, h: torch.Tensor, x: torch.Tensor, layer: DecoderLayer, step) -> torch.Tensor:
        """The full FFN, reported to the engine when it traces (u, and the residual x and block output f)."""
        parts = self.parts[i]
        u = activations(parts, h)
        y = linear(u, parts.down, parts.down_bias)
        d = self.decoder
        if layer.post_ffn_norm is not None:
            y = rms_norm(y, layer.post_ffn_norm, d.norm_eps, d.norm_offset)
        if step is not None:
            self.engine.trace(i, h[None], u[None], x[None] if step.importance else None,
                              y[None] if step.importance else None)
        return y

    def _attention(self, i: int, layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   start: int, mask: torch.Tensor | None) -> torch.Tensor:
        d = self.decoder
        tokens = h.shape[0]
        q = linear(h, layer.q, layer.q_bias).view(tokens, d.heads, d.head_dim)
        k = linear(h, layer.k, layer.k_bias).view(tokens, d.kv_heads, d.head_dim)
        v = linear(h, layer.v, layer.v_bias).view(tokens, d.kv_heads, d.head_dim)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, d.norm_eps, d.norm_offset)
            k = rms_norm(k, layer.k_norm, d.norm_eps, d.norm_offset)
        q = apply_rotary(q.float(), cos[:, None], sin[:, None])
        k = apply_rotary(k.float(), cos[:, None], sin[:, None])
        end = start + tokens
        cache_k, cache_v = self.cache.k[i], self.cache.v[i]
        cache_k[:, start:end] = k.transpose(0, 1)
        cache_v[:, start:end] = v.float().transpose(0, 1)
        group = d.heads // d.kv_heads
        queries = q.transpose(0, 1).reshape(d.kv_heads, group * tokens, d.head_dim)   # [kv, group * T, hd]
        keys = cache_k[:, :end].transpose(1, 2)
        if mask is not None and d.attention_softcap is None:      # scale, product and mask in one op
            scores = torch.baddbmm(mask.expand(d.kv_heads, -1, -1), queries, keys, alpha=d.attention_scale)
        else:
            scores = torch.bmm(queries, keys).mul_(d.attention_scale)
            if d.attention_softcap is not None:
                scores = torch.tanh(scores / d.attention_softcap) * d.attention_softcap
            if mask is not None:
                scores += mask
        out = torch.bmm(scores.softmax(-1), cache_v[:, :end])                          # [kv, group * T, hd]
        out = out.view(d.heads, tokens, d.head_dim).transpose(0, 1).reshape(tokens, d.heads * d.head_dim)
        return linear(out.to(self.compute), layer.o, layer.o_bias)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of `ids` in the compute dtype (the model's own module where that is its dtype)."""
        if self.compute == self.dtype:
            return self.decoder.embed(ids)
        return F.embedding(ids, self.decoder.embed.weight).to(self.compute) * self.embed_scale

    def _mask(self, start: int, tokens: int, window: int | None) -> torch.Tensor:
        """[group * tokens, start + tokens] float32 added to the scores: 0 where query i (position start + i, in each
        of the `group` query heads sharing a key head) sees key j, -inf elsewhere."""
        query = torch.arange(start, start + tokens, device=self.device)[:, None]
        position = torch.arange(start + tokens, device=self.device)[None]
        visible = position <= query
        if window is not None:
            visible &= query - position < window
        mask = torch.zeros(visible.shape, device=self.device).masked_fill_(~visible, -math.inf)
        return mask.repeat(self.decoder.heads // self.decoder.kv_heads, 1)
