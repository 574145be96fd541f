"""Pruned execution without a copy of the weights.

An FFN computes the same function whatever the order of its neurons, as long as the rows of W_gate/W_up (and
b_up) and the columns of W_down are permuted together. `PrefixFFN` permutes a layer's own weights in place so that
the neurons a sequence keeps come first; the pruned FFN is then the dense FFN over a prefix of the weights: views,
no copy. A re-trace swaps only the neurons that enter with the ones that leave, and `restore` puts every neuron
back where it was, bit for bit.

A prefix of the columns of a row-major [hidden, I] down projection is a strided read, which streams at about half
the speed of memory on the CPUs measured here; so while an engine prunes, each FFN weight stored that way is laid
out neuron-major instead (the same parameter, its storage transposed: `to_neuron_major`; the down projection of
most families, GPT-2's up projection), and put back when the engine closes. Values never change; Hugging Face's
own forward reads either layout. Not in bfloat16 or float16 on a CPU when PyTorch multiplies in that dtype (a
Hugging Face forward; `neuron_major_pays`): there its matmul over that layout is about 5x slower than over the
row-major one, whose strided prefix runs at full speed; those weights stay row-major and their neurons move as
columns. The native loop widens such weights to float32 as it reads them, and its engine lays them out neuron-major.

Scores and kept sets are always in neuron ids (the original order); `order[p]` is the id of the neuron now at
position p (int32: for Llama-3.1-8B shapes the orders of all layers are 1.8 MB).
"""
from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dartprune.architectures import FFNParts
from dartprune.compiled import build, cpu_flags

SWAP_SOURCE = Path(__file__).with_name("swap.c")
_swap_library: ctypes.CDLL | str | None = None       # built on first use; a string says why it cannot be
_swap_enabled = True


def set_compiled_swap(enabled: bool) -> None:
    """Use the compiled swap where it builds (the default) or PyTorch's always, for this process: benchmarks
    compare the two (`DARTPRUNE_KERNEL=0` turns all compiled code off from the start)."""
    global _swap_enabled
    _swap_enabled = enabled


def swap_library() -> ctypes.CDLL | None:
    """The compiled in-place row swap (swap.c), or None where it cannot be built or is switched off (the swaps
    then go through PyTorch: same values, about twice the memory traffic)."""
    global _swap_library
    if _swap_library is None:
        _swap_library = build(SWAP_SOURCE, "swap")
        if not isinstance(_swap_library, str):
            _swap_library.dart_swap_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                     ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            _swap_library.dart_swap_rows.restype = None
            _swap_library.dart_unpermute_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            _swap_library.dart_unpermute_rows.restype = ctypes.c_int
            _swap_library.dart_swap_cols.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            _swap_library.dart_swap_cols.restype = None
            _swap_library.dart_unpermute_cols.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                                          ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            _swap_library.dart_unpermute_cols.restype = ctypes.c_int
    return None if isinstance(_swap_library, str) or not _swap_enabled else _swap_library


def native_reduced_matmul(dtype: torch.dtype) -> bool:
    """Whether PyTorch's matmul in `dtype` runs on this CPU's own instructions, so that it beats widening the
    weights to float32: bfloat16 where the CPU has AVX-512 BF16 or AMX and PyTorch has oneDNN, which uses them.
    Elsewhere it is emulated and slower than widening (measured on AVX2); float16 is not known to pay on any CPU
    measured here."""
    return (dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"}))


class PrefixFFN:
    """One layer's FFN, its neurons permuted in place so that the first `k` are the kept ones."""

    def __init__(self, parts: FFNParts):
        # detached views of the same storage: the in-place swaps are not autograd's business
        detached = {name: getattr(parts, name).detach() if getattr(parts, name) is not None else None
                    for name in ("gate", "up", "up_bias", "down", "down_bias")}
        self.parts = FFNParts(**detached, act=parts.act)
        size = parts.intermediate_size
        self.order = torch.arange(size, dtype=torch.int32)
        self._position: torch.Tensor | None = None      # the inverse of `order`, made when first asked for
        self.k = size
        self._views()

    @property
    def size(self) -> int:
        return self.parts.intermediate_size

    def position(self) -> torch.Tensor:
        """position[i]: where neuron id i is now (int64; made on demand, kept until the order changes; read-only)."""
        if self._position is None:
            self._position = torch.empty(self.size, dtype=torch.long)
            self._position[self.order.long()] = torch.arange(self.size)
        return self._position

    def kept(self) -> torch.Tensor:
        """The kept neuron ids, ascending."""
        return self.order[:self.k].long().sort().values

    def _rows(self) -> list[torch.Tensor]:
        p = self.parts
        return [t for t in (p.gate, p.up, p.up_bias) if t is not None]

    def _compiled_moves(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The weights as the compiled routines move them: contiguous rows per neuron (gate, up, up bias, a
        neuron-major down projection), and row-major matrices whose columns are the neurons (a weight left
        row-major: `neuron_major_pays`). None where the compiled swap is unavailable or switched off, the weights
        are not on the CPU, or one is laid out neither way."""
        if swap_library() is None or self.parts.up.device.type != "cpu":
            return None
        rows, columns = [], []
        for t in self._rows() + [self.parts.down.t()]:
            if t.is_contiguous():
                rows.append(t)
            elif t.dim() == 2 and t.t().is_contiguous() and t.element_size() in (2, 4, 8):
                columns.append(t.t())
            else:
                return None
        return rows, columns

    def uses_compiled_swap(self) -> bool:
        """Whether this layer's swaps run through the compiled routines."""
        return self._compiled_moves() is not None

    @torch.no_grad()
    def _swap(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Exchange the neurons at positions a and b (same-length index vectors, disjoint)."""
        moves = self._compiled_moves()
        if moves is not None:
            lib, threads = swap_library(), torch.get_num_threads()
            a64, b64 = a.to(torch.int64).contiguous(), b.to(torch.int64).contiguous()
            rows, columns = moves
            for t in rows:   # each row read once and written once, in place (a and b: disjoint, in range)
                lib.dart_swap_rows(t.data_ptr(), t.stride(0) * t.element_size(), a64.data_ptr(), b64.data_ptr(),
                                   a64.numel(), threads)
            for m in columns:
                lib.dart_swap_cols(m.data_ptr(), m.shape[0], m.stride(0) * m.element_size(), m.element_size(),
                                   a64.data_ptr(), b64.data_ptr(), a64.numel(), threads)
        else:
            self._copy_neurons(torch.cat([a, b]), torch.cat([b, a]))
        order = self.order.clone()          # a new tensor: drivers may run under inference mode or not
        order[torch.cat([b, a])] = torch.cat([self.order[a], self.order[b]])
        self.order, self._position = order, None

    @torch.no_grad()
    def _copy_neurons(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """The neuron at position src[i] to position dst[i] in every weight, through PyTorch (a temporary holds
        the moved rows, so src and dst may overlap). The down projection moves as whole rows of its neuron-major
        storage when it has one (a strided column gather is several times slower)."""
        device = self.parts.up.device
        src, dst = src.to(device), dst.to(device)
        for rows in self._rows():
            rows.index_copy_(0, dst, rows.index_select(0, src))
        down = self.parts.down
        if down.t().is_contiguous():
            down.t().index_copy_(0, dst, down.t().index_select(0, src))
        else:
            down.index_copy_(1, dst, down.index_select(1, src))

    def keep(self, kept: torch.Tensor) -> int:
        """Make neuron ids `kept` the prefix; returns how many neurons entered it."""
        k = kept.numel()
        if k != self.k:
            self.k = k
            self._views()
        was = self.position()[kept]
        entering = was[was >= k]                                   # kept neurons now outside the prefix
        if entering.numel():
            is_kept = torch.zeros(self.size, dtype=torch.bool)
            is_kept[kept] = True
            leaving = (~is_kept[self.order[:k].long()]).nonzero().flatten()  # prefix positions of neurons not kept
            self._swap(leaving, entering)
        return int(entering.numel())

    @torch.no_grad()
    def restore(self) -> None:
        """Every neuron back at its original position (the weights equal the model's own again, exactly). Through
        the compiled routine where it applies: it runs after every sequence, and PyTorch's copies took about 70 ms
        per sequence at SmolLM2 shapes."""
        misplaced = (self.order != torch.arange(self.size, dtype=torch.int32)).nonzero().flatten()
        if misplaced.numel():
            moves = self._compiled_moves()
            if moves is None:
                self._copy_neurons(misplaced, self.order[misplaced].long())
            else:
                self._unpermute(*moves)
            self.order, self._position = torch.arange(self.size, dtype=torch.int32), None
        if self.k != self.size:
            self.k = self.size
            self._views()

    def _unpermute(self, rows: list[torch.Tensor], columns: list[torch.Tensor]) -> None:
        """`restore`'s moves through the compiled routines: the rows of every weight in one call, then the columns
        of each row-major one. Each call checks the order first and moves nothing when it is not a permutation, so
        the first call refuses it with every weight as it was."""
        lib, threads, order = swap_library(), torch.get_num_threads(), self.order.contiguous()

        def check(status: int) -> None:
            if status == -2:
                raise RuntimeError("the neuron order is not a permutation; the weights were left as they are")
            if status:
                raise MemoryError("restoring the neuron order: the compiled routine could not allocate its buffers")

        if rows:
            bases = (ctypes.c_void_p * len(rows))(*[t.data_ptr() for t in rows])
            row_bytes = (ctypes.c_int64 * len(rows))(*[t.stride(0) * t.element_size() for t in rows])
            check(lib.dart_unpermute_rows(bases, row_bytes, len(rows), order.data_ptr(), self.size, threads))
        for m in columns:
            check(lib.dart_unpermute_cols(m.data_ptr(), m.shape[0], m.stride(0) * m.element_size(), m.element_size(),
                                          order.data_ptr(), self.size, threads))

    def to_ids(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position values ([..., I]) re-indexed by neuron id."""
        return values.index_select(-1, self.position().to(values.device))

    def mask(self, kept: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A 0/1 mask over positions [I] that keeps neuron ids `kept` (the mask path's form)."""
        ids = torch.zeros(self.size, dtype=dtype)
        ids[kept] = 1
        return ids[self.order.long()]

    def _views(self) -> None:
        """Prefix views made once per k (slicing every forward costs dispatches); they follow in-place swaps."""
        p, k = self.parts, self.k
        self.gate_t = p.gate[:k].t() if p.gate is not None else None
        self.up_t = p.up[:k].t()
        self.up_bias = p.up_bias[:k] if p.up_bias is not None else None
        self.down_t = p.down[:, :k].t()

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """u of every neuron for the few inputs x ([tokens, hidden]) of a re-trace, by position ([tokens, I]).
        In float32 computed as W x^T: for a ring's 16 tokens about a sixth faster than x W^T on a CPU. The values
        are the same as x W^T's at 16 tokens here; at some other counts (2-11 here) they can differ in the last
        bits. In bfloat16 and float16 on a CPU without the instructions for it (`native_reduced_matmul`) the weights
        are widened to float32 first and the product is x W^T: PyTorch's reduced-precision matmul is the slow part
        there (2.0 ms per projection at SmolLM2's shapes and 16 tokens on an AVX2 CPU, where widening takes 0.07 ms
        and the float32 product 0.9). Where the CPU has them the product stays in the weights' dtype (0.05 ms
        against 0.28 widened on an AVX-512 BF16 CPU); the scores then come from bfloat16 activations."""
        p = self.parts
        if p.up.device.type == "cpu" and p.up.dtype in (torch.bfloat16, torch.float16):
            if not native_reduced_matmul(p.up.dtype):
                return activations(p, x.float())
            x = x.to(p.up.dtype)
        xt = x.t()
        pre = torch.mm(p.up, xt) if p.up_bias is None else torch.addmm(p.up_bias[:, None], p.up, xt)
        u = p.act(torch.mm(p.gate, xt)).mul_(pre) if p.gated else p.act(pre)
        return u.t().contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN over the kept prefix. Two or three 2-D matmuls: every op is paid once per layer and token. In
        x's dtype (the prefix widened to it a block at a time where x is wider: the native loop computes in float32
        on a CPU)."""
        flat = x.reshape(-1, x.shape[-1])
        act, dtype = self.parts.act, flat.dtype
        if self.up_t.dtype != dtype:
            p, k = self.parts, self.k
            prefix = dataclasses.replace(p, gate=None if p.gate is None else p.gate[:k], up=p.up[:k],
                                         up_bias=self.up_bias, down=p.down[:, :k])
            y = masked_ffn(prefix, flat, None)
            return y.view(*x.shape[:-1], y.shape[-1])
        gate, up, up_bias = self.gate_t, self.up_t, self.up_bias
        if gate is not None:
            u = act(torch.mm(flat, gate))
            u.mul_(torch.mm(flat, up))
        elif up_bias is not None:
            u = act(torch.addmm(up_bias, flat, up))
        else:
            u = act(torch.mm(flat, up))
        down, bias = self.down_t, self.parts.down_bias
        y = torch.mm(u, down) if bias is None else torch.addmm(bias, u, down)
        return y.view(*x.shape[:-1], y.shape[-1])


class ModuleFFN:
    """A layer whose weights are not in memory while it waits (offloaded by accelerate's device map to the CPU or
    disk, and loaded by its hooks only while its own modules run): it runs through the model's FFN module, the
    activations of pruned neurons masked by a forward pre-hook on the down projection. Correct, not faster; the
    neuron order never changes, so the `PrefixFFN` interface holds with the identity order."""

    def __init__(self, module: nn.Module, down: nn.Module, size: int):
        self.module, self.size, self.k = module, size, size
        self._kept = torch.arange(size)
        self._mask: torch.Tensor | None = None
        self._captured: torch.Tensor | None = None
        self._hook = down.register_forward_pre_hook(self._on_down)

    def _on_down(self, module: nn.Module, args: tuple):
        if self._captured is not None:
            self._captured = args[0].detach()
            return None
        if self._mask is not None:
            return (args[0] * self._mask.to(args[0].device, args[0].dtype),)
        return None

    def kept(self) -> torch.Tensor:
        return self._kept

    def to_ids(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def mask(self, kept: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(self.size, dtype=dtype)
        out[kept] = 1
        return out

    def keep(self, kept: torch.Tensor) -> int:
        was = torch.zeros(self.size, dtype=torch.bool)
        was[self._kept] = True
        entering = int((~was[kept]).sum())
        self._kept, self.k = kept, kept.numel()
        return entering

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """u for inputs x: the module runs (so its weights are loaded) and the down projection's input is kept."""
        self._captured = torch.empty(0)
        try:
            self.module(x)
            return self._captured
        finally:
            self._captured = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The module with pruned activations zeroed: `mask` ([batch, 1, I], the mask path's per-row masks) or
        this layer's own kept set."""
        self._mask = mask if mask is not None else self.mask(self._kept, x.dtype)
        try:
            return self.module(x)
        finally:
            self._mask = None

    def restore(self) -> None:
        self._kept, self.k = torch.arange(self.size), self.size

    def release(self) -> None:
        """The masking hook off the down projection (the engine closes)."""
        self.restore()
        self._hook.remove()


def offloaded(parts: FFNParts) -> bool:
    """The FFN's weights are placeholders (meta tensors) that accelerate loads only while the modules run."""
    return any(t is not None and t.device.type == "meta" for t in (parts.gate, parts.up, parts.down))


@torch.no_grad()
def own_pages(tensor: torch.Tensor) -> None:
    """Write every memory page of a CPU tensor once, with the values it holds.

    Weights loaded from safetensors live in a copy-on-write mapping of the file: the first write to each page of
    it faults and copies the page (about 5x the time of the write itself). The engine writes these weights in
    place (its neuron swaps), so it pays that once here, when it is built, rather than inside a prompt's first
    token or a re-trace. For memory that is already the process's own this costs one store per page."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    flat = tensor.detach().view(-1) if tensor.is_contiguous() else tensor.detach().t().reshape(-1)
    if flat.data_ptr() != tensor.data_ptr():
        return                                    # not one dense block of storage: nothing this could fault in
    stride = max(1, 4096 // tensor.element_size())
    flat[::stride] = flat[::stride].clone()
    flat[-1:] = flat[-1:].clone()                 # the last page, where the tensor does not start on a page


def neuron_major_pays(weight: torch.Tensor, widened: bool = False) -> bool:
    """Whether a pruned prefix of `weight` runs faster laid out neuron-major. Not in bfloat16 or float16 on a CPU
    when PyTorch multiplies in that dtype: its matmul over a weight stored that way takes a path about 5x slower
    than over the row-major layout (dense as well as a prefix; measured on SmolLM2's shapes, where a row-major prefix
    of half the columns runs in 0.6x the dense time and the neuron-major one in 2.5x). `widened`: the reader widens
    the weights to float32 first (the native loop and its compiled step), where it pays as in float32 (SmolLM2,
    bfloat16, compiled step: 10.9 against 12.8 ms per token at sparsity 0.5, 9.6 against 11.1 at 0.7)."""
    return widened or weight.device.type != "cpu" or weight.dtype in (torch.float32, torch.float64)


def to_neuron_major(weight: nn.Parameter, rows: torch.Tensor, widened: bool = False) -> bool:
    """Lay out `weight`, the contiguous 2-D parameter behind `rows` (an FFN weight as one row per neuron: gate or up
    [I, hidden], or the down projection's transpose), so that each neuron's row is contiguous; True if it was
    changed (`to_row_major` undoes it). Changed where `rows` is the parameter's transpose (a [hidden, I] down
    projection in most families, GPT-2's Conv1D up projection, stored [hidden, I]) and the layout pays
    (`neuron_major_pays`)."""
    if weight.dim() != 2 or not weight.is_contiguous() or rows.is_contiguous() or \
            not neuron_major_pays(weight, widened):
        return False
    weight.data = weight.data.t().contiguous().t()
    return True


def transposed_parameters(layer: nn.Module, parts: FFNParts) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """The FFN weights as rows per neuron (gate, up, the down projection's transpose), each with the parameter of
    `layer` that is its transpose (what `to_neuron_major` may lay out anew); rows that are a parameter itself, or a
    slice of one (a fused gate/up projection), are already neuron-major and left out."""
    found = []
    for rows in (parts.gate, parts.up, parts.down.t()):
        if rows is None:
            continue
        found += [(weight, rows) for weight in layer.parameters() if weight.dim() == 2 and
                  weight.data_ptr() == rows.data_ptr() and weight.shape == rows.shape[::-1] and
                  weight.stride() == rows.stride()[::-1]][:1]
    return found


def to_row_major(weight: nn.Parameter) -> None:
    weight.data = weight.data.contiguous()


def in_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` in `dtype`: itself, or a copy where it is stored in another (bfloat16 weights read by a float32
    computation)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           block_bytes: int = 1 << 20) -> torch.Tensor:
    """x W^T (+ b) in x's dtype. A weight stored narrower (bfloat16 read by the native loop's float32 computation)
    is widened whole up to 4 blocks of float32, else `block_bytes` at a time, by output rows (or by input columns
    where it is stored transposed, neuron-major): a float32 copy of a large weight is a fresh allocation that
    faults on every page (SmolLM2's 113 MB output projection times one token: 40-47 ms widened whole against
    5 ms in 1 MB blocks here; an 8B model's would need 2.1 GB)."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    bias = in_dtype(bias, x.dtype)
    if weight.numel() * x.element_size() <= 4 * block_bytes:
        return F.linear(x, weight.to(x.dtype), bias)
    out_features, in_features = weight.shape
    if weight.stride(-1) == 1 or weight.stride(0) != 1:
        rows = max(1, block_bytes // (in_features * x.element_size()))
        return torch.cat([F.linear(x, weight[i:i + rows].to(x.dtype), None if bias is None else bias[i:i + rows])
                          for i in range(0, out_features, rows)], dim=-1)
    cols = max(1, block_bytes // (out_features * x.element_size()))
    out = F.linear(x[..., :cols], weight[:, :cols].to(x.dtype), bias)
    for j in range(cols, in_features, cols):
        out.add_(F.linear(x[..., j:j + cols], weight[:, j:j + cols].to(x.dtype)))
    return out


def activations(parts: FFNParts, x: torch.Tensor) -> torch.Tensor:
    """u for inputs x with the full weights (in the weights' current neuron order), in x's dtype."""
    pre = linear(x, parts.up, parts.up_bias)
    return parts.act(linear(x, parts.gate)) * pre if parts.gated else parts.act(pre)


def masked_ffn(parts: FFNParts, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference path: the dense FFN with the activations of pruned neurons multiplied by 0 (no mask: dense), in
    x's dtype."""
    u = activations(parts, x)
    return linear(u if mask is None else u * mask, parts.down, parts.down_bias)
