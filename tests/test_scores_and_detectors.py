"""Options of the scores and of the drift monitor that the end-to-end tests do not reach: the EMA score (within a
forward and across the forwards of a long trace), the blend of old and fresh scores on a re-trace and at a new
conversation turn, and the level-shift detector on signals whose cosines are known."""
from __future__ import annotations

import math

import pytest
import torch

from dartprune import DartConfig
from dartprune.decode.model import NativeModel
from dartprune.engine import Engine
from dartprune.engine.drift import ShiftDetector, make_detector
from dartprune.engine.scoring import squared_activations, top_neurons
from tests.test_methods import capture
from tests.tiny_models import random_ids, tiny_model


# ------------------------------------------------------------------------------------------- EMA score
def test_ema_weights_the_newest_valid_token_heaviest_and_skips_padding():
    torch.manual_seed(0)
    u = torch.randn(2, 6, 5)
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    decay = 0.8
    got = squared_activations(u, valid, "ema", decay)
    for b in range(2):
        times = valid[b].nonzero().flatten().tolist()
        expected = sum((1 - decay) * decay ** (len(times) - 1 - n) * u[b, t].square() for n, t in enumerate(times))
        torch.testing.assert_close(got[b], expected, rtol=1e-6, atol=1e-7)


def test_ema_score_over_a_trace_split_into_forwards_equals_one_pass():
    """A prompt shorter than min_trace_tokens keeps tracing through decoded tokens: the running sums decay by the
    tokens each forward adds, so the score is the EMA over every traced token at once."""
    model = tiny_model("llama")
    ids = random_ids(1, 20, seed=11)[0]
    u = capture(model, ids[None])                 # dense activations of the 20 tokens, per layer [20, I]
    decay = 0.9
    engine = Engine(model, DartConfig(sparsity=0.5, score="ema", ema_decay=decay, min_trace_tokens=20,
                                      detector="none"))
    try:
        native = NativeModel(model, engine)
        native.forward(ids[:12])
        native.forward(ids[12:15])
        for t in range(15, 20):
            native.forward(ids[t:t + 1])
        weights = (1 - decay) * decay ** torch.arange(19, -1, -1, dtype=torch.float32)
        for layer, u_l in enumerate(u):
            expected = (weights[:, None] * u_l.square()).sum(dim=0).sqrt()
            torch.testing.assert_close(engine.scores(0, layer), expected, rtol=1e-5, atol=1e-7)
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------- re-trace blend
def _scores_around_a_retrace(blend: float) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Scores before and after one forced re-trace, and the kept ids after it, on fixed tokens."""
    model = tiny_model("llama")
    ids = random_ids(1, 40, seed=12)[0]
    engine = Engine(model, DartConfig(sparsity=0.5, detector="none", retrace_blend=blend))
    try:
        native = NativeModel(model, engine)
        native.forward(ids[:16])
        for t in range(16, 40):
            native.forward(ids[t:t + 1])
        layers = range(len(engine.sizes))
        before = [engine.scores(0, i).clone() for i in layers]
        engine.retrace(0)
        return before, [engine.scores(0, i).clone() for i in layers], [engine.kept(0, i).clone() for i in layers]
    finally:
        engine.close()


def test_a_retrace_blends_unit_old_and_fresh_scores():
    """new = (1 - b) unit(fresh) + b unit(old): fresh from b = 0 on the same tokens; b = 1 keeps the old ranking."""
    old, fresh, _ = _scores_around_a_retrace(0.0)
    old_b, blended, _ = _scores_around_a_retrace(0.3)
    old_1, after_1, kept_1 = _scores_around_a_retrace(1.0)
    for layer in range(len(old)):
        torch.testing.assert_close(old_b[layer], old[layer])
        assert not torch.allclose(fresh[layer] / fresh[layer].norm(), old[layer] / old[layer].norm(), atol=1e-3)
        expected = 0.7 * fresh[layer] / fresh[layer].norm() + 0.3 * old[layer] / old[layer].norm()
        torch.testing.assert_close(blended[layer], expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(after_1[layer], old_1[layer] / old_1[layer].norm(), rtol=1e-5, atol=1e-7)
        assert torch.equal(kept_1[layer], top_neurons(old_1[layer], kept_1[layer].numel()))


def _scores_after_a_turn(blend: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    model = tiny_model("llama")
    ids = random_ids(1, 30, seed=13)[0]
    engine = Engine(model, DartConfig(sparsity=0.5, detector="none", turn_blend=blend))
    try:
        native = NativeModel(model, engine)
        native.forward(ids[:18])                  # the first turn; the second follows it at once, so that both
        layers = range(len(engine.sizes))         # run dense over a dense cache (traced like prompts)
        before = [engine.scores(0, i).clone() for i in layers]
        native.forward(ids[18:30], new_turn=True)
        return before, [engine.scores(0, i).clone() for i in layers]
    finally:
        engine.close()


def test_a_new_turn_scores_its_own_tokens_blended_with_the_earlier_scores():
    """turn_blend 0: the scores are the turn's tokens' alone (their dense activations, traced like a prompt);
    0.4: 0.6 unit(turn) + 0.4 unit(earlier)."""
    model = tiny_model("llama")
    u = capture(model, random_ids(1, 30, seed=13))          # the whole conversation dense, per layer [30, I]
    before, alone = _scores_after_a_turn(0.0)
    before_b, blended = _scores_after_a_turn(0.4)
    for layer, u_l in enumerate(u):
        torch.testing.assert_close(alone[layer], u_l[18:30].square().sum(dim=0).sqrt(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(before_b[layer], before[layer])
        expected = 0.6 * alone[layer] / alone[layer].norm() + 0.4 * before[layer] / before[layer].norm()
        torch.testing.assert_close(blended[layer], expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------- level-shift test
HIDDEN, WINDOW = 6, 4


def _tokens(cosines: list[float], spread: list[float] | None = None) -> torch.Tensor:
    """[1 layer, W per value, hidden]: every token of window k at cosine cosines[k] to e0 (in the e0-e1 plane),
    tilted by spread[k] along e2 (so windows differ while their mean direction stays exact)."""
    rows = []
    for k, c in enumerate(cosines):
        vector = torch.zeros(HIDDEN)
        vector[0], vector[1] = c, math.sqrt(max(0.0, 1 - c * c))
        if spread:
            vector[2] = spread[k]
        rows.append(vector.expand(WINDOW, HIDDEN))
    return torch.cat(rows)[None]


def _detector() -> ShiftDetector:
    return ShiftDetector.from_config(DartConfig(detector="shift", window=WINDOW, shift_history=6, shift_persist=2,
                                                shift_k=2.5, shift_floor=0.15))


def _feed(detector: ShiftDetector, cosines: list[float], start: int) -> list[int]:
    """Windows one forward each; the indices of those after which a re-trace is due."""
    fired = []
    for k, c in enumerate(cosines):
        if detector.observe(_tokens([c]), start + (k + 1) * WINDOW):
            fired.append(k)
    return fired


def test_level_shift_ignores_a_slow_drift_and_fires_on_a_step():
    detector = _detector()
    detector.fit(_tokens([1.0] * 4, spread=[0.1, -0.1, 0.1, -0.1]))     # mean direction e0 exactly
    torch.testing.assert_close(detector.reference[0, 0], torch.tensor(1.0))
    steady = [0.95] * 8
    slow = [0.95 - 0.01 * k for k in range(1, 21)]                        # 0.94 ... 0.75, a window at a time
    assert _feed(detector, steady + slow, start=16) == []
    fired = _feed(detector, [0.2], start=16 + 28 * WINDOW)
    assert fired == [0]                           # (0.75 + 0.2) / 2 < median(0.81 ... 0.76) - 0.15
    assert detector.records[-1].pressure == 1 and detector.records[-1].cosine == pytest.approx(0.2, abs=1e-6)
    assert len(detector.records) == 29


def test_level_shift_waits_for_history_and_learns_again_after_a_refit():
    detector = _detector()
    detector.fit(_tokens([1.0]))                 # one window: not enough to fit, later tokens complete it
    assert detector.reference is None
    assert _feed(detector, [1.0], start=4) == [] and detector.reference is not None
    detector.refit(_tokens([0.2, 0.2], spread=[0.05, -0.05]))     # re-traced on the new text: it is the reference
    assert _feed(detector, [0.2] * 6, start=100) == []
    assert _feed(detector, [-0.9], start=200) == [0]


def test_the_paper_rule_fires_on_the_same_slow_drift():
    """The contrast the level-shift test exists for: the paper's threshold comes from the traced windows."""
    config = DartConfig(detector="paper", window=WINDOW, trigger_count=1, cooldown=0, delta=0.1, floor=0.1)
    detector = make_detector(config)
    detector.fit(_tokens([1.0] * 4, spread=[0.1, -0.1, 0.1, -0.1]))
    slow = [0.95 - 0.01 * k for k in range(1, 21)]
    assert _feed(detector, slow, start=16)
