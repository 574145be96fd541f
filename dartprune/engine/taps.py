"""Seeing what a Hugging Face model's FFNs do, for tracing (the engine) and calibration, through one mechanism.

`FFNTaps` stands a small module in for each layer's FFN. In a dense forward it runs the original module and
reports (layer, x, u, h, f): x the FFN's input, u its activations (the down projection's input, read by a forward
pre-hook), h the residual stream entering the FFN block (its norm's input, a pre-hook too) and f the block's
output (after the post-FFN norm where a family has one). In a pruned forward it calls `pruned(layer, x)` instead
and nothing is read: the hooks are only installed while dense forwards run.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dartprune.architectures import get_adapter

Report = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], None]


def refuse_assign(local_metadata: dict) -> None:
    """`load_state_dict(assign=True)` would put new tensors where the engine holds views of the old ones."""
    if local_metadata.get("assign_to_params_buffers"):
        raise RuntimeError("load_state_dict(assign=True) would replace the weights that dartprune prunes in place; "
                           "detach, load, and attach again")


class TappedFFN(nn.Module):
    """Stands in for one layer's FFN module (the original stays its child and runs unchanged when dense). The
    original's attributes are found through it (`mlp.gate_proj`), and its own state dict has the original's keys
    (`mlp.state_dict()` as without dartprune); in the model's state dict the keys are the model's own (see
    `LayerKeys`)."""

    def __init__(self, index: int, original: nn.Module, taps: FFNTaps):
        super().__init__()
        self.index = index
        self.original = original
        self._taps = [taps]      # a list, so the taps are not registered as a submodule
        self._names = list(original.state_dict(keep_vars=True))
        self.register_state_dict_post_hook(self._own_keys)
        self.register_load_state_dict_pre_hook(self._child_keys)

    @staticmethod
    def _own_keys(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        keys = [k for k in state if k.startswith(prefix + "original.")]   # this module's, last in `state` just now
        state.update([(prefix + k[len(prefix) + len("original."):], state.pop(k)) for k in keys])

    @staticmethod
    def _child_keys(module: nn.Module, state: dict, prefix: str, local_metadata: dict, *args) -> None:
        refuse_assign(local_metadata)
        for name in module._names:
            if prefix + name in state:
                state[prefix + "original." + name] = state.pop(prefix + name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original":
                raise
            return getattr(self.original, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self._taps[0]
        if not taps.dense:
            return taps.pruned(self.index, x)
        y = self.original(x)
        taps.observed(self.index, x, y)
        return taps.on_masks(self.index, x, y) if taps.mixed else y


class LayerKeys:
    """Keeps a layer's state-dict keys those of the model, so that an attached model saves and loads as the model
    it is (offloaded weights included). Each of the FFN's tensors is found by identity before the stand-in goes in:
    in the layer under the stand-in it is `<slot>.<name in the FFN module>` (the stand-in's own keys), in the model
    it is its own name in the layer: the same for most families (`mlp.<name>`), but OPT's FFN is two modules of the
    layer itself, `fc1` and `fc2`, with the stand-in in the slot of `fc1`."""

    def __init__(self, layer: nn.Module, original: nn.Module):
        names = {id(t): name for name, t in layer.state_dict(keep_vars=True).items()}
        self.model_names = {name: names[id(t)] for name, t in original.state_dict(keep_vars=True).items()}
        self.layer = layer
        self.hooks: list = []

    def install(self, tapped: TappedFFN) -> None:
        """After the stand-in took its slot in the layer."""
        slot = next(name for name, child in self.layer.named_children() if child is tapped)
        tapped_names = {f"{slot}.{name}": own for name, own in self.model_names.items()}
        model_names = {own: tapped for tapped, own in tapped_names.items()}

        def to_model(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
            keys = [k for k in state if k.startswith(prefix)]           # the layer's, last in `state` just now
            items = [(prefix + tapped_names.get(k[len(prefix):], k[len(prefix):]), state.pop(k)) for k in keys]
            state.update(items)

        def to_tapped(module: nn.Module, state: dict, prefix: str, local_metadata: dict, *args) -> None:
            refuse_assign(local_metadata)
            for own, tapped in model_names.items():
                if prefix + own in state:
                    state[prefix + tapped] = state.pop(prefix + own)

        self.hooks = [self.layer.register_state_dict_post_hook(to_model),
                      self.layer.register_load_state_dict_pre_hook(to_tapped)]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


class FFNTaps:
    """Installed on a model until `remove()`; `dense` says which kind of forward comes next."""

    def __init__(self, model: nn.Module, report: Report,
                 pruned: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 on_masks: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.adapter = get_adapter(model)
        self.layers = self.adapter.layers()
        self.report = report
        self.pruned = pruned
        self.on_masks = on_masks     # a dense forward's output -> with the rows that do not trace on their masks
        self.dense = True
        self.want_h = True
        self.mixed = False
        self._u: dict[int, torch.Tensor] = {}
        self._h: dict[int, torch.Tensor] = {}
        self._hooks: list = []
        # looked up before the stand-ins replace the FFN modules (adapters find them through the FFN module)
        self.originals = [self.adapter.ffn(layer) for layer in self.layers]
        self._downs = [self.adapter.down_proj(layer) for layer in self.layers]
        self._norms = [self.adapter.ffn_input_norm(layer) for layer in self.layers]
        self._out_norms = [self.adapter.ffn_output_norm(layer) for layer in self.layers]
        self._keys = [LayerKeys(layer, original) for layer, original in zip(self.layers, self.originals)]
        self.stand_ins = [TappedFFN(i, original, self) for i, original in enumerate(self.originals)]
        for layer, tapped, keys in zip(self.layers, self.stand_ins, self._keys):
            self.adapter.set_ffn(layer, tapped)
            keys.install(tapped)
        self.set_mode(dense=True, want_h=True)

    def set_mode(self, dense: bool, want_h: bool = False, mixed: bool = False) -> None:
        """Dense forwards read u (and h when `want_h`); pruned forwards read nothing. mixed: a dense forward in
        which some rows do not trace (their outputs go through `on_masks`)."""
        self.mixed = dense and mixed
        if (dense, want_h) == (self.dense, self.want_h) and (self._hooks or not dense):
            return
        self._remove_hooks()
        self.dense, self.want_h = dense, want_h
        if not dense:
            return
        for i in range(len(self.layers)):
            self._hooks.append(self._downs[i].register_forward_pre_hook(self._keep(self._u, i)))
            norm = self._norms[i]
            if want_h and norm is not None:
                self._hooks.append(norm.register_forward_pre_hook(self._keep(self._h, i)))

    def observed(self, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        u = self._u.pop(index, None)
        h = f = None
        if self.want_h:
            h = self._h.pop(index, x)            # families without an FFN input norm: the input is h
            norm = self._out_norms[index]
            f = norm(y) if norm is not None else y
        self.report(index, x, u, h, f)

    @staticmethod
    def _keep(store: dict[int, torch.Tensor], index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            store[index] = args[0].detach()
        return hook

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._u.clear()
        self._h.clear()

    def remove(self) -> None:
        """The model's own FFN modules back, no hooks."""
        self._remove_hooks()
        for keys in self._keys:
            keys.remove()
        for layer, original in zip(self.layers, self.originals):
            self.adapter.set_ffn(layer, original)
