"""A decode step with static shapes, for CUDA graphs: on a GPU a batch-1 step of a small model is bound by the
launch of its hundreds of kernels, and a CUDA graph replays them all in one launch.

Positions are tensors, the key/value cache is attended over its whole capacity under a mask, and the pruned FFN
runs over the kept prefix of each layer's permuted weights (its shape fixed for the sequence; a re-trace swaps
weights in place, which the captured graph reads as they are). The engine's bookkeeping (ring buffer, drift
monitor, re-traces) runs around each replay from the step's output buffers. A step that must run dense and be
traced (a short prompt's first tokens, the authors' dense-steps re-trace, a new turn) goes through the ordinary
forward. On the CPU the same step runs eagerly: that is how it is tested without a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dartprune.decode.model import NativeModel, apply_rotary, rms_norm


class GraphStep:
    """One-token steps of `native` with static shapes, replayed from a CUDA graph when `capture` (CUDA only)."""

    def __init__(self, native: NativeModel, capture: bool | None = None):
        self.native = native
        self.capture = native.device.type == "cuda" if capture is None else capture
        if self.capture and native.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if native.engine is not None and native.engine.prunes and not native.engine.prefix_capable:
            raise ValueError("the static-shape step runs each pruned layer over its kept prefix: it needs the "
                             "compact path, a kept-set method and every weight in memory (path='mask', per-token "
                             "methods and offloaded layers run through NativeModel.forward)")
        d = native.decoder
        device = native.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = torch.zeros(1, d.lm_head.shape[0], device=device)
        hidden = d.lm_head.shape[1]
        self.inputs = torch.zeros(len(d.layers), 1, 1, hidden, dtype=native.dtype, device=device)
        monitored = native.engine.monitored if native.engine is not None else []
        self.attention = torch.zeros(len(monitored), 1, 1, hidden, device=device)
        self._graph = None
        self._shape = None                       # (capacity, keep counts) the graph was captured for

    def _body(self) -> None:
        """The step itself: reads self.token and self.position, writes the output buffers and the cache."""
        native, d = self.native, self.native.decoder
        engine = native.engine
        capacity = native.cache.capacity
        tables = native.rotary(capacity)
        keys = torch.arange(capacity, device=native.device)
        x = d.embed(self.token)                                               # [1, H]
        for i, layer in enumerate(d.layers):
            cos, sin = (t.index_select(0, self.position) for t in tables[layer.rope])
            h = rms_norm(x, layer.input_norm, d.norm_eps, d.norm_offset)
            q = F.linear(h, layer.q, layer.q_bias).view(1, d.heads, d.head_dim)
            k = F.linear(h, layer.k, layer.k_bias).view(1, d.kv_heads, d.head_dim)
            v = F.linear(h, layer.v, layer.v_bias).view(1, d.kv_heads, d.head_dim)
            if layer.q_norm is not None:
                q = rms_norm(q, layer.q_norm, d.norm_eps, d.norm_offset)
                k = rms_norm(k, layer.k_norm, d.norm_eps, d.norm_offset)
            q = apply_rotary(q.float(), cos[:, None], sin[:, None])
            k = apply_rotary(k.float(), cos[:, None], sin[:, None])
            native.cache.k[i].index_copy_(1, self.position, k.transpose(0, 1))
            native.cache.v[i].index_copy_(1, self.position, v.float().transpose(0, 1))
            group = d.heads // d.kv_heads
            scores = torch.bmm(q.view(d.kv_heads, group, d.head_dim), native.cache.k[i].transpose(1, 2))
            scores = scores * d.attention_scale
            if d.attention_softcap is not None:
                scores = torch.tanh(scores / d.attention_softcap) * d.attention_softcap
            visible = keys <= self.position
            if layer.window is not None:
                visible = visible & (self.position - keys < layer.window)
            scores = scores.masked_fill(~visible, -float("inf"))
            out = torch.bmm(scores.softmax(-1), native.cache.v[i]).view(1, d.heads * d.head_dim)
            a = F.linear(out.to(native.dtype), layer.o, layer.o_bias)
            if i in native.monitored:
                self.attention[native.monitored[i]].copy_(a.view(1, 1, -1))
            if layer.post_attention_norm is not None:
                a = rms_norm(a, layer.post_attention_norm, d.norm_eps, d.norm_offset)
            x = x + a
            h = rms_norm(x, layer.ffn_norm, d.norm_eps, d.norm_offset)
            self.inputs[i].copy_(h.view(1, 1, -1))
            if engine is not None and engine.prunes:
                y = engine.prefix[i].forward(h)
            else:
                parts = native.parts[i]
                pre = F.linear(h, parts.up, parts.up_bias)
                u = parts.act(F.linear(h, parts.gate)) * pre if parts.gated else parts.act(pre)
                y = F.linear(u, parts.down, parts.down_bias)
            if layer.post_ffn_norm is not None:
                y = rms_norm(y, layer.post_ffn_norm, d.norm_eps, d.norm_offset)
            x = x + y
        logits = F.linear(rms_norm(x, d.final_norm, d.norm_eps, d.norm_offset), d.lm_head).float()
        if d.final_softcap is not None:
            logits = torch.tanh(logits / d.final_softcap) * d.final_softcap
        self.logits.copy_(logits)

    def _replay(self) -> None:
        if not self.capture:
            self._body()
            return
        engine = self.native.engine
        shape = (self.native.cache.capacity, tuple(engine.keep_counts()) if engine is not None else ())
        if self._graph is None or shape != self._shape:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._body()                      # warm-up outside the capture (allocations, lazy init)
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._body()
            self._shape = shape
        self._graph.replay()

    @torch.inference_mode()
    def forward(self, token: int) -> torch.Tensor:
        """Logits [1, vocab] of one token after the sequence so far (which the ordinary forward started)."""
        native = self.native
        engine = native.engine
        position = native.cache.length
        if position == 0:
            raise ValueError("start the sequence with NativeModel.forward (the prompt); then step")
        if engine is not None and engine.next_forward_dense():
            return native.forward(torch.tensor([token]))          # traced dense: the ordinary forward
        native.cache.ensure(position + 1)
        step = engine.begin_forward(torch.ones(1, 1, dtype=torch.bool)) if engine is not None else None
        self.token.fill_(token)
        self.position.fill_(position)
        self._replay()
        native.cache.length = position + 1
        if engine is not None:
            engine.record_inputs(self.inputs)
            if step.monitor:
                for j in range(self.attention.shape[0]):
                    engine.observe_attention(j, self.attention[j])
            engine.end_forward()
        return self.logits.clone()

