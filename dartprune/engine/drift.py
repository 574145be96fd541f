"""Drift detectors (docs/algorithm.md §4): each watches one sequence's monitored signal (the attention output of
the monitored layers, [layers, tokens, hidden] float32) and says when the text has moved on. They are found by
name (`DartConfig.detector`) in a registry, like the methods."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from dartprune.engine.config import DartConfig

_EPS = 1e-12


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over monitored layers of cos(a_l, b_l); a, b: [layers, hidden]."""
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=_EPS).mean())


@dataclass
class WindowRecord:
    """One monitored window, for stats and plots."""

    position: int
    cosine: float
    threshold: float
    pressure: int


class Detector(ABC):
    """One sequence's drift detector."""

    name: ClassVar[str] = ""
    records: list[WindowRecord]

    @classmethod
    @abstractmethod
    def from_config(cls, config: DartConfig) -> Detector:
        """A fresh detector with the configuration's settings (`make_detector` builds each row's this way)."""

    @abstractmethod
    def fit(self, signal: torch.Tensor) -> None:
        """Start over from the signal of the tokens a mask was traced on."""

    @abstractmethod
    def observe(self, signal: torch.Tensor, end_position: int) -> bool:
        """Take the signal of new tokens (ending at sequence position `end_position`); True when a re-trace is due."""

    def refit(self, signal: torch.Tensor) -> None:
        """After a re-trace, from the signal of the tokens it was traced on."""
        self.fit(signal)


DETECTORS: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    DETECTORS[cls.name] = cls
    return cls


def make_detector(config: DartConfig) -> Detector:
    return DETECTORS[config.detector].from_config(config)


@register_detector
@dataclass
class PaperDetector(Detector):
    """The paper's rule: each window of W tokens is compared (cosine of its mean) with the traced tokens' mean
    direction; a window below mu - max(delta * sigma, floor) (mu, sigma over the traced tokens' own windows) adds
    one to a pressure that other windows lower by one; the pressure reaching c0 asks for a re-trace, after which
    `cooldown` windows pass unscored."""

    name: ClassVar[str] = "paper"
    window: int
    delta: float
    floor: float
    trigger_count: int
    cooldown: int
    reference: torch.Tensor | None = None
    mu: float = 0.0
    sigma: float = 0.0
    threshold: float = float("-inf")
    pressure: int = 0
    cooldown_left: int = 0
    records: list[WindowRecord] = field(default_factory=list)
    _baseline: list[torch.Tensor] = field(default_factory=list)
    _pending: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: DartConfig) -> PaperDetector:
        return cls(config.window, config.delta, config.floor, config.trigger_count, config.cooldown)

    @property
    def fitted(self) -> bool:
        return self.reference is not None

    def fit(self, signal: torch.Tensor) -> None:
        """Start over from the tokens a mask was traced on; with fewer than 2 windows, wait for more tokens."""
        self.reference = None
        self._baseline = [signal.float()]
        self._pending = []
        self.pressure = 0
        self.cooldown_left = 0
        self._try_fit()

    def _try_fit(self) -> None:
        tokens = torch.cat(self._baseline, dim=1)
        windows = tokens.shape[1] // self.window
        if windows < 2:
            return
        self.reference = tokens.mean(dim=1)
        cosines = torch.tensor([_cos(w.mean(dim=1), self.reference)
                                for w in tokens[:, : windows * self.window].split(self.window, dim=1)])
        self.mu = float(cosines.mean())
        self.sigma = float(cosines.std(unbiased=False))
        self.threshold = self.mu - max(self.delta * self.sigma, self.floor)
        self._baseline = []

    def observe(self, signal: torch.Tensor, end_position: int) -> bool:
        """Take the attention outputs of new tokens; True when a re-trace is due.

        end_position: the sequence position just after the last of these tokens (for the records).
        """
        if not self.fitted:
            self._baseline.append(signal.float())
            self._try_fit()
            return False
        self._pending.append(signal.float())
        pending = torch.cat(self._pending, dim=1)
        trigger = False
        while pending.shape[1] >= self.window and not trigger:
            window, pending = pending[:, : self.window], pending[:, self.window:]
            cosine = _cos(window.mean(dim=1), self.reference)
            if self.cooldown_left > 0:
                self.cooldown_left -= 1
            elif cosine < self.threshold:
                self.pressure += 1
            else:
                self.pressure = max(0, self.pressure - 1)
            self.records.append(WindowRecord(end_position - pending.shape[1], cosine, self.threshold,
                                             self.pressure))
            trigger = self.pressure >= self.trigger_count
        self._pending = [pending] if pending.shape[1] else []
        return trigger

    def refit(self, signal: torch.Tensor) -> None:
        """After a re-trace: new baseline from the buffer, pressure reset, a cooldown before the next trigger."""
        self.fit(signal)
        self.cooldown_left = self.cooldown


@register_detector
@dataclass
class ShiftDetector(Detector):
    """A level-shift test on the same cosines, robust to the text drifting slowly away from its prompt.

    Each window of W tokens gives c = cos(window mean, reference) as in the paper's rule, but a window is compared
    with the level of the sequence's own recent windows, not with the traced tokens' in-sample cosines (which sit
    higher than any later window of the same text: the reference is their own mean). The level is the median of
    the last `history` windows before the `persist` newest ones, the spread their median absolute deviation; a
    re-trace is due when the mean of the newest `persist` windows falls below level - max(k * spread, floor).
    The history starts from the traced tokens' leave-one-out cosines (each window against the mean of the others)
    and restarts after every re-trace."""

    name: ClassVar[str] = "shift"
    window: int
    history: int
    persist: int
    k: float
    floor: float
    reference: torch.Tensor | None = None
    values: list[float] = field(default_factory=list)
    records: list[WindowRecord] = field(default_factory=list)
    _pending: list[torch.Tensor] = field(default_factory=list)
    _baseline: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: DartConfig) -> ShiftDetector:
        return cls(config.window, config.shift_history, config.shift_persist, config.shift_k, config.shift_floor)

    def fit(self, signal: torch.Tensor) -> None:
        self._baseline = [signal.float()]
        self.reference, self.values, self._pending = None, [], []
        self._try_fit()

    def _try_fit(self) -> None:
        tokens = torch.cat(self._baseline, dim=1)
        count = tokens.shape[1] // self.window
        if count < 2:
            return
        windows = tokens[:, :count * self.window].reshape(tokens.shape[0], count, self.window, -1).mean(dim=2)
        total = windows.sum(dim=1)
        self.values = [_cos(windows[:, k], (total - windows[:, k]) / (count - 1)) for k in range(count)]
        self.reference = tokens.mean(dim=1)
        self._baseline = []

    def observe(self, signal: torch.Tensor, end_position: int) -> bool:
        if self.reference is None:
            self._baseline.append(signal.float())
            self._try_fit()
            return False
        self._pending.append(signal.float())
        pending = torch.cat(self._pending, dim=1)
        trigger = False
        while pending.shape[1] >= self.window and not trigger:
            window, pending = pending[:, :self.window], pending[:, self.window:]
            kept = self.values[-(self.history + self.persist - 1):]      # all the test looks at
            self.values = [*kept, _cos(window.mean(dim=1), self.reference)]
            past = self.values[-(self.history + self.persist):-self.persist]
            if len(past) < 2:
                continue
            level = float(torch.tensor(past).median())
            spread = 1.4826 * float((torch.tensor(past) - level).abs().median())
            threshold = level - max(self.k * spread, self.floor)
            recent = sum(self.values[-self.persist:]) / self.persist
            trigger = recent < threshold
            self.records.append(WindowRecord(end_position - pending.shape[1], self.values[-1], threshold,
                                             int(trigger)))
        self._pending = [pending] if pending.shape[1] else []
        return trigger


@register_detector
@dataclass
class NoDetector(Detector):
    """Never asks for a re-trace: the masks change only at a new conversation turn (or a forced `retrace`)."""

    name: ClassVar[str] = "none"
    records: list[WindowRecord] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: DartConfig) -> NoDetector:
        return cls()

    def fit(self, signal: torch.Tensor) -> None:
        pass

    def observe(self, signal: torch.Tensor, end_position: int) -> bool:
        return False
