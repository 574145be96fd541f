"""`DartConfig`: every parameter of the algorithm (docs/algorithm.md §1-5), validated once, in one place.

The method is checked against the method registry (`dartprune.methods`), so a method registered by another
module is as valid as the built-in ones."""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

ALLOCATIONS = ("dart", "uniform")
IMPORTANCES = ("residual", "ffn-vs-input")
SCORES = ("l2", "ema")
PRIORS = (None, "vocab-max", "vocab-mean")
RETRACE_MODES = ("buffer", "dense-steps")
PATHS = ("compact", "mask")


class ConfigError(ValueError):
    """A DartConfig value or key is not valid."""


MAX_RING_SIZE = 4096


@dataclass
class DartConfig:
    """How to prune. Defaults and why: docs/algorithm.md; `method` selects DART or a baseline run by the same engine.

    sparsity: fraction of FFN neurons removed, averaged over layers, in [0, 1).
    allocation: "dart" (sensitivity and depth-aware budgets from the prompt) or "uniform".
    importance: layer importance signal: "residual" = (1 - cos(h, h + f)) * |f| / |h| (§2), or
        "ffn-vs-input" = the authors' (1 - cos(h, f)) * |f| / |h|, kept for ablation.
    early_width/late_width/early_floor/late_floor: depth protection w_e, w_l, a, b.
    p_min/p_max: per-layer pruning-ratio clip bounds.
    score: "l2" (sqrt of summed squares over traced tokens) or "ema" (exponential decay `ema_decay` over tokens).
    prior: optional static per-neuron prior multiplied into the scores.
    prune_prefill: also prune the prompt's forward (after a dense pass that traces it, for the methods whose masks
        come from the prompt).
    min_trace_tokens: a prompt shorter than this is too short to trace from: the first decoded tokens run dense
        and are traced too, and the masks are built once this many tokens have been traced (the paper's
        masking step). 1 builds them from the prompt whatever its length.
    detector: the drift detector (`dartprune.engine.drift.DETECTORS`): "paper" (default) tests each window of W
        tokens against the traced tokens' windows (delta, floor, trigger_count, cooldown); "shift" tests it
        against the level of the sequence's own recent windows (shift_history, shift_persist, shift_k,
        shift_floor): far fewer triggers inside unchanged text, and less quality; "none" never fires (masks
        change only at a new turn).
    window: W, tokens per monitored window.
    delta/floor/trigger_count/cooldown: the paper rule's delta, floor, c0 and windows ignored after a re-trace.
    monitored_layers: layers whose attention output is watched: indices (int, negative counts from the end) or
        relative depths (float in [0, 1]: 0.0 the first layer, 1.0 the last).
    ring_size: R, tokens of FFN inputs kept per layer for re-tracing.
    retrace: "buffer" (score the ring buffer with full weights) or "dense-steps" (the authors': run dense for
        `dense_steps` tokens, then rebuild).
    retrace_blend: weight of the old scores blended into the new ones on a re-trace (0 = reset, the plain form).
    turn_blend: weight of the earlier scores blended into a new conversation turn's (0 = the turn alone).
    retrace_spread: tokens over which a buffer re-trace's scoring is spread (each forward scores a share of the
        layers in proportion to the tokens it brings, each layer switching to its new neurons when scored), so
        that no decode step stalls for the whole re-trace; 1 scores every layer in the forward that triggered
        it.
    build_spread: tokens over which the first masks of a sequence move into the weights (each forward after the
        prompt moves a share of the layers; a layer not yet moved runs dense), so that moving them is not part of
        the time to the first token (a share of ceil(layers / s) layers a token, so at most `s` tokens); 1 moves
        every layer at the end of the prompt's forward.
    path: "compact" (gathered smaller weights: really faster) or "mask" (multiply by a 0/1 mask: reference).
    seed: for the random method.
    calibration_file: saved calibration for wanda-static and threshold.

    The drift defaults (the paper's rule on the last layer, W = 5, c0 = 3, cooldown 4, R = 16, blend 0.3) were
    chosen on the tune half of the drift benchmark; docs/algorithm.md, "Defaults and why", gives the measurements.
    """

    method: str = "dart"
    sparsity: float = 0.5
    allocation: Literal["dart", "uniform"] = "dart"
    importance: Literal["residual", "ffn-vs-input"] = "residual"
    early_width: float = 0.3
    late_width: float = 0.15
    early_floor: float = 0.25
    late_floor: float = 0.35
    p_min: float = 0.1
    p_max: float = 0.9
    score: Literal["l2", "ema"] = "l2"
    ema_decay: float = 0.9
    prior: str | None = None
    prune_prefill: bool = False
    min_trace_tokens: int = 1
    detector: str = "paper"
    shift_history: int = 6
    shift_persist: int = 2
    shift_k: float = 2.5
    shift_floor: float = 0.15
    window: int = 5
    delta: float = 0.1
    floor: float = 0.1
    trigger_count: int = 3
    cooldown: int = 4
    monitored_layers: tuple[int | float, ...] = field(default=(-1,))
    ring_size: int = 16
    retrace: Literal["buffer", "dense-steps"] = "buffer"
    dense_steps: int = 16
    retrace_blend: float = 0.3
    retrace_spread: int = 1
    build_spread: int = 1
    turn_blend: float = 0.0
    path: Literal["compact", "mask"] = "compact"
    seed: int = 0
    calibration_file: str | None = None

    def __post_init__(self) -> None:
        layers = self.monitored_layers
        if isinstance(layers, (numbers.Real, str)) or not isinstance(layers, Iterable):
            layers = (layers,)
        # numpy scalars become Python ones: an index stays an int, a relative depth a float
        self.monitored_layers = tuple(int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                      else float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool)
                                      else v for v in layers)
        if isinstance(self.prune_prefill, np.bool_):
            self.prune_prefill = bool(self.prune_prefill)
        if isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool):
            self.seed = int(self.seed)
        self.validate()

    def validate(self) -> None:
        from dartprune.methods import METHODS
        _choice("method", self.method, tuple(METHODS))
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("importance", self.importance, IMPORTANCES)
        _choice("score", self.score, SCORES)
        _choice("prior", self.prior, PRIORS)
        _choice("retrace", self.retrace, RETRACE_MODES)
        from dartprune.engine.drift import DETECTORS
        _choice("detector", self.detector, tuple(DETECTORS))
        _choice("path", self.path, PATHS)
        for name in _NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.prune_prefill, bool):
            raise ConfigError(f"prune_prefill must be true or false, got {self.prune_prefill!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        check_seed(self.seed, ConfigError)
        if self.calibration_file is not None and not isinstance(self.calibration_file, (str, os.PathLike)):
            raise ConfigError(f"calibration_file must be a path, got {self.calibration_file!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        for name in ("early_width", "late_width", "early_floor", "late_floor", "p_min", "p_max", "ema_decay",
                     "retrace_blend", "turn_blend"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
        if self.early_width <= 0 or self.late_width <= 0:
            raise ConfigError("early_width and late_width must be > 0")
        if self.p_min > self.p_max:
            raise ConfigError(f"p_min ({self.p_min}) must not exceed p_max ({self.p_max})")
        for name in ("window", "trigger_count", "ring_size", "dense_steps", "retrace_spread", "build_spread",
                     "min_trace_tokens",
                     "shift_history", "shift_persist"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.ring_size > MAX_RING_SIZE:        # the ring holds every layer's FFN inputs of that many tokens
            raise ConfigError(f"ring_size must be <= {MAX_RING_SIZE}, got {self.ring_size}")
        if isinstance(self.cooldown, bool) or not isinstance(self.cooldown, numbers.Integral) or self.cooldown < 0:
            raise ConfigError(f"cooldown must be an integer >= 0, got {self.cooldown!r}")
        if self.delta < 0 or self.floor < 0 or self.shift_k < 0 or self.shift_floor < 0:
            raise ConfigError("delta, floor, shift_k and shift_floor must be >= 0")
        if not self.monitored_layers:
            raise ConfigError("monitored_layers must name at least one layer")
        for layer in self.monitored_layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, float)) or (
                    isinstance(layer, float) and not 0.0 <= layer <= 1.0):
                raise ConfigError(f"monitored_layers takes layer indices (int) or relative depths (float in "
                                  f"[0, 1]), got {layer!r}")
        needs = METHODS[self.method].calibration
        if needs is not None and self.calibration_file is None:
            raise ConfigError(f"method {self.method!r} needs calibration_file (make one with "
                              f"`dartprune calibrate --method {needs}`)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DartConfig:
        """Build from user input (CLI, lm-eval model_args), naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown DartConfig key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> DartConfig:
        return dataclasses.replace(self, **changes)

    @property
    def pruned_sparsity(self) -> float:
        """The sparsity the method prunes at: 0 for a method that prunes nothing. `sparsity` itself keeps what was
        asked, so that a config derived from a dense one (a server's per-request method) prunes at it."""
        from dartprune.methods import METHODS
        return self.sparsity if METHODS[self.method].prunes else 0.0


def check_seed(seed: int, error: type[Exception] = ValueError) -> None:
    """Seeds are in [0, 2^63), what torch's generators take, so that one --seed fits the method and the sampler."""
    if not 0 <= seed < 2 ** 63:
        raise error(f"seed must be in [0, 2^63), got {seed}")


def parse_settings(settings: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs with Python-literal values where they parse (numbers, tuples, True/False/None; true and
    false as on a command line), else strings ("none" stays a string: it is a detector's name)."""
    import ast
    values: dict[str, object] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"a setting must look like KEY=VALUE, got {item!r}")
        word = raw.strip().lower()
        if word in ("true", "false"):
            values[key.strip()] = word == "true"
            continue
        try:
            values[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values[key.strip()] = raw
    return values


def check_no_method_or_sparsity(settings: dict[str, object], method_option: str = "--methods") -> None:
    """Settings given beside --methods (eval, bench; generate, chat and serve: --method) and --sparsity must not
    name either: those options say which, and one of two values would silently lose."""
    for key in ("method", "sparsity"):
        if key in settings:
            raise ConfigError(f"set {key} with {method_option if key == 'method' else '--sparsity'}, not --set")


def monitored_layer_indices(layers: tuple[int | float, ...], count: int) -> list[int]:
    """Layer indices from `monitored_layers` for a model of `count` layers: integers index (negative from the end),
    floats are relative depths (0.0 the first layer, 1.0 the last), so one default fits models of any depth."""
    out = set()
    for layer in layers:
        if isinstance(layer, float):
            out.add(round(layer * (count - 1)))
        elif not -count <= layer < count:
            raise ConfigError(f"monitored layer {layer} is out of range for a model with {count} layers")
        else:
            out.add(layer % count)
    return sorted(out)


_NUMBERS = ("sparsity", "early_width", "late_width", "early_floor", "late_floor", "p_min", "p_max", "ema_decay",
            "shift_k", "shift_floor", "delta", "floor", "retrace_blend", "turn_blend")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
