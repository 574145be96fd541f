"""A lean greedy decode loop for Llama-family models, for measuring what pruning buys without Hugging Face
`generate`'s per-token overhead (about a third of a SmolLM2 decode step on a 2-core CPU).

It is a benchmark tool, not a second engine: the prompt runs through the model's own forward (so an attached
DART handle traces it as usual), then each new token runs a minimal forward with a static KV cache, fused
q/k/v weights and one rotary multiply for q and k together. The layer FFN is called as a module (`layer.mlp`),
so an attached handle's `PrunedFFN` runs its own compact path; the model's forward hooks and the attention
modules' forward hooks are called by hand at the points where a normal forward would call them, so the handle
still starts each step, watches the drift signal and re-traces. Without a handle, the dense FFN runs with gate
and up fused into one matrix, the strongest dense baseline for the same loop.

Supported: model types whose decoder layers look like Llama's (`llama`, `mistral`, `qwen2`; no sliding window,
default or scaled RoPE). Batch of one, greedy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers import DynamicCache

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")


def lean_supported(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in LEAN_MODEL_TYPES and not getattr(config, "sliding_window", None)


def _call_pre_hooks(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Run `module`'s forward pre-hooks as `module(*args, **kwargs)` would (torch's own hook dicts)."""
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def _call_hooks(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Run `module`'s forward hooks on an output computed outside `module.forward`."""
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, args, kwargs, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            output = result
    return output


class _CacheLength:
    """What a forward pre-hook needs to see of the cache: its length (the handle asks `get_seq_length`)."""

    def __init__(self) -> None:
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


@dataclass
class _Layer:
    module: nn.Module
    qkv_t: torch.Tensor             # [hidden, q|k|v] (a transposed view): input norm weight folded in,
    qkv_bias: torch.Tensor | None   # q columns pre-scaled by head_dim^-0.5
    o_t: torch.Tensor
    o_bias: torch.Tensor | None
    norm_post: torch.Tensor         # the model's weight times sqrt(hidden), for inputs of a handle's FFN
    k_cache: torch.Tensor           # [kv_heads, head_dim, max_len]: keys stored transposed, so the scores are one
    v_cache: torch.Tensor           # bmm on a slice; values [kv_heads, max_len, head_dim]
    gate_up_t: torch.Tensor | None = None   # dense baseline: [hidden, 2I], post-attention norm weight folded in
    down_t: torch.Tensor | None = None
    act: Callable | None = None
    dense_mlp: nn.Module | None = None


@dataclass
class LeanResult:
    tokens: torch.Tensor
    ttft_s: float
    token_times_s: list[float] = field(default_factory=list)
    token_cpu_s: list[float] = field(default_factory=list)


class LeanDecoder:
    """Greedy decoding of one sequence with a static KV cache. Build once per model, reuse for many runs.

    On this kind of CPU a PyTorch op costs about 1-3 us however small, and a 30-layer model runs thousands of
    them per token, so the step is written to run few: activations stay [1, hidden]; every matmul is one
    `torch.mm` on a weight transposed once; RMSNorm is x * rsqrt(x.x + H eps), its weight (and sqrt(H)) folded
    into the next matmul where that matmul belongs to the loop (q/k/v always; gate/up for the dense baseline,
    never for a handle's FFN, whose input must stay the model's own); the attention scale is folded into the q
    columns; rotary embedding is one [head_dim, head_dim] rotation matmul per position for q and k together;
    attention is two batched matmuls, on keys cached transposed (a slice of them is the bmm operand as it is,
    which measured 17 against 28 us per call for a transposed slice). Keys, values and attention run in float32
    whatever the model dtype (bfloat16 small matmuls are several times slower on CPU), so a bfloat16 run's
    tokens may differ from Hugging Face's after a while; the benchmark reports whether they match. Runs under
    `torch.inference_mode`. The loop holds copies of the attention weights (and, for the dense baseline, of
    gate/up).
    """

    def __init__(self, model: nn.Module, max_len: int):
        if not lean_supported(model):
            raise ValueError(f"the lean decode loop supports model types {LEAN_MODEL_TYPES} without sliding "
                             f"window, not {getattr(model.config, 'model_type', None)!r}")
        config = model.config
        self.model = model
        self.max_len = max_len
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.eps = config.rms_norm_eps
        self.h_eps = self.hidden * self.eps
        self.root_h = self.hidden ** 0.5
        base = model.model
        self.embed = base.embed_tokens.weight
        self.dtype = self.embed.dtype
        device = self.embed.device
        self.float32 = self.dtype == torch.float32
        scale = self.head_dim ** -0.5
        q_rows = self.heads * self.head_dim
        layers = list(base.layers)
        self.k_cache = torch.zeros(len(layers), self.kv_heads, self.head_dim, max_len, device=device)
        self.v_cache = torch.zeros(len(layers), self.kv_heads, max_len, self.head_dim, device=device)
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for i, layer in enumerate(layers):
                attn = layer.self_attn
                w_norm = layer.input_layernorm.weight.float() * self.root_h
                qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).float() * w_norm
                qkv[:q_rows] *= scale
                bias = None
                if attn.q_proj.bias is not None:
                    bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).float()
                    bias[:q_rows] *= scale
                    bias = bias.to(self.dtype)
                self.layers.append(_Layer(
                    module=layer, qkv_t=qkv.to(self.dtype).contiguous().t(), qkv_bias=bias, o_t=attn.o_proj.weight.t(),
                    o_bias=attn.o_proj.bias,
                    norm_post=(layer.post_attention_layernorm.weight.float() * self.root_h).to(self.dtype),
                    k_cache=self.k_cache, v_cache=self.v_cache))
            self.final_norm = (base.norm.weight.float() * self.root_h).to(self.dtype)
            self.lm_head_t = model.get_output_embeddings().weight.t()
            positions = torch.arange(max_len, device=device)[None]
            cos, sin = base.rotary_emb(self.embed[:1][None].float(), positions)
            cos, sin = cos[0].float(), sin[0].float()                        # [max_len, head_dim]
            half = self.head_dim // 2
            signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
            # x * cos + rotate_half(x) * sin == x @ R, R = diag(cos) + roll(I, half) diag(signed sin)
            roll = torch.eye(self.head_dim, device=device).roll(half, 0)
            self.rotation = (torch.diag_embed(cos) + roll[None] * signed_sin[:, None, :]).contiguous()
        for i, lay in enumerate(self.layers):         # views made outside no_grad, so any mode may write them
            lay.k_cache, lay.v_cache = self.k_cache[i], self.v_cache[i]
        self._cache_length = _CacheLength()
        self._dense_ready = False

    def fuse_dense_ffn(self) -> None:
        """Fused gate/up weights for the dense baseline (made on first use: it copies the FFN weights)."""
        if self._dense_ready:
            return
        with torch.no_grad():
            for lay in self.layers:
                mlp = lay.module.mlp
                if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                    continue
                w_norm = lay.module.post_attention_layernorm.weight.float() * self.root_h
                gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float() * w_norm
                lay.dense_mlp = mlp
                lay.gate_up_t = gate_up.to(self.dtype).contiguous().t()
                lay.down_t = mlp.down_proj.weight.t()
                lay.act = mlp.act_fn
        self._dense_ready = True

    def extra_bytes(self) -> int:
        """Memory the loop holds beyond the model: fused copies, the static cache, the rotations."""
        tensors = [t for lay in self.layers for t in (lay.qkv_t, lay.gate_up_t) if t is not None]
        tensors += [self.k_cache, self.v_cache, self.rotation]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ----------------------------------------------------------------- one token
    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) * sqrt(H) = x * rsqrt(x.x + H eps): the norm weight and sqrt(H) go into the next matmul."""
        flat = x.view(-1)
        if self.float32:
            return x * torch.dot(flat, flat).add_(self.h_eps).rsqrt_()
        xf = flat.float()
        return (xf * torch.dot(xf, xf).add_(self.h_eps).rsqrt_()).to(x.dtype).view_as(x)

    def _step(self, token: torch.Tensor, pos: int, hooked: bool) -> torch.Tensor:
        model = self.model
        nh, kvh, hd = self.heads, self.kv_heads, self.head_dim
        group = nh // kvh
        ids = token.view(1, 1)
        if hooked:
            self._cache_length.length = pos
            call_kwargs = {"input_ids": ids, "cache": self._cache_length, "use_cache": True}
            _call_pre_hooks(model, (), call_kwargs)
        x = self.embed[token].view(1, -1)                                     # [1, hidden], model dtype
        rotation = self.rotation[pos]
        end = pos + 1
        for lay in self.layers:
            heads = torch.mm(self._normed(x), lay.qkv_t)
            if lay.qkv_bias is not None:
                heads += lay.qkv_bias
            heads = heads.view(nh + 2 * kvh, hd)
            if not self.float32:
                heads = heads.float()
            qk = torch.mm(heads[: nh + kvh], rotation)
            lay.k_cache[:, :, pos].copy_(qk[nh:])
            lay.v_cache[:, pos].copy_(heads[nh + kvh:])
            scores = torch.bmm(qk[:nh].view(kvh, group, hd), lay.k_cache[:, :, :end])
            out = torch.bmm(scores.softmax(-1), lay.v_cache[:, :end]).view(1, nh * hd)
            if not self.float32:
                out = out.to(self.dtype)
            a = torch.mm(out, lay.o_t) if lay.o_bias is None else torch.addmm(lay.o_bias, out, lay.o_t)
            if hooked:
                attn = lay.module.self_attn
                if attn._forward_hooks:
                    _call_hooks(attn, (x.view(1, 1, -1),), {}, (a.view(1, 1, -1), None))
            x = x + a
            mlp = lay.module.mlp
            if mlp is lay.dense_mlp and not mlp._forward_hooks and not mlp._forward_pre_hooks:
                gu = torch.mm(self._normed(x), lay.gate_up_t)
                size = lay.down_t.shape[0]
                u = lay.act(gu[:, :size])
                u.mul_(gu[:, size:])
                x = x + torch.mm(u, lay.down_t)
            else:
                h = self._normed(x) * lay.norm_post
                x = x + mlp(h.view(1, 1, -1)).view(1, -1)
        logits = torch.mm(self._normed(x) * self.final_norm, self.lm_head_t)
        if hooked:
            _call_hooks(model, (), call_kwargs, None)
        return logits.view(-1).argmax()

    # ----------------------------------------------------------------- a whole sequence
    @torch.inference_mode()
    def begin(self, ids: torch.Tensor, new_tokens: int, sync: Callable[[], None] | None = None) -> LeanRun:
        """The prompt through the model's own forward (traced by an attached handle) and the first token."""
        if ids.shape[0] != 1:
            raise ValueError("the lean loop decodes one sequence (batch of 1)")
        prompt = ids.shape[1]
        if prompt + new_tokens > self.max_len:
            raise ValueError(f"prompt ({prompt}) + new tokens ({new_tokens}) exceed max_len {self.max_len}")
        sync = sync or (lambda: None)
        hooked = bool(self.model._forward_pre_hooks or self.model._forward_hooks)
        self.fuse_dense_ffn()
        start = time.perf_counter()
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, cache=cache, use_cache=True)
        token = out.logits[0, -1].argmax()
        for i, layer in enumerate(cache.layers):
            self.k_cache[i, :, :, :prompt] = layer.keys[0].float().transpose(1, 2)
            self.v_cache[i, :, :prompt] = layer.values[0].float()
        del out, cache
        sync()
        result = LeanResult(tokens=torch.empty(new_tokens, dtype=torch.long), ttft_s=time.perf_counter() - start)
        result.tokens[0] = token
        return LeanRun(result=result, token=token, prompt=prompt, new_tokens=new_tokens, hooked=hooked, sync=sync)

    @torch.inference_mode()
    def advance(self, run: LeanRun) -> bool:
        """One more token of `run` (timed on its own); False when the run has all its tokens. Two decoders (two
        model copies) can advance alternately, so both see the same load from other processes."""
        step = run.step
        if step >= run.new_tokens:
            return False
        start, cpu = time.perf_counter(), time.process_time()
        run.token = self._step(run.token, run.prompt + step - 1, run.hooked)
        run.result.tokens[step] = run.token
        run.sync()
        run.result.token_times_s.append(time.perf_counter() - start)
        run.result.token_cpu_s.append(time.process_time() - cpu)
        run.step += 1
        return run.step < run.new_tokens

    def generate(self, ids: torch.Tensor, new_tokens: int, sync: Callable[[], None] | None = None) -> LeanResult:
        """Greedy: the prompt through the model's own forward, then `new_tokens - 1` lean steps. Times: the
        first token after the prompt, then each step."""
        run = self.begin(ids, new_tokens, sync)
        while self.advance(run):
            pass
        return run.result


@dataclass
class LeanRun:
    """A sequence being decoded by `LeanDecoder.advance`."""

    result: LeanResult
    token: torch.Tensor
    prompt: int
    new_tokens: int
    hooked: bool
    sync: Callable[[], None]
    step: int = 1
