"""The engine on the real SmolLM2-135M: exactness, and the drift monitor on a text that changes domain."""

import pytest
import torch

import dartprune
from dartprune import DartConfig
from tests.helpers import teacher_forced_logits

PREFIX, SWITCH, END = 256, 512, 768


def tokens(tokenizer, text: str, start: int, count: int) -> list[int]:
    return tokenizer(text[start:start + 30000]).input_ids[:count]


@pytest.fixture(scope="module")
def texts(smollm2, data_root):
    from dartprune.data import load_text
    _, tokenizer = smollm2
    austen = tokens(tokenizer, load_text("gutenberg:austen-emma", data_root).text, 5000, END)
    bible = tokens(tokenizer, load_text("gutenberg:bible-kjv", data_root).text, 5000, END - SWITCH)
    return {"switch": torch.tensor([austen[:SWITCH] + bible]), "homogeneous": torch.tensor([austen])}


def run(model, ids, config, prefix: int = PREFIX):
    with dartprune.attach(model, config) as handle:
        logits = teacher_forced_logits(model, ids, prefix=prefix, chunk=config.window)
        return logits, handle.stats()[0]


def test_zero_sparsity_and_compact_vs_mask_on_smollm2(smollm2, texts):
    model, _ = smollm2
    ids = texts["switch"][:, :300]
    dense = teacher_forced_logits(model, ids, prefix=200, chunk=DartConfig().window)
    zero, _ = run(model, ids, DartConfig(sparsity=0.0), prefix=200)
    assert torch.equal(dense, zero)
    compact, stats_compact = run(model, ids, DartConfig(sparsity=0.7), prefix=200)
    mask, stats_mask = run(model, ids, DartConfig(sparsity=0.7, path="mask"), prefix=200)
    assert (compact - mask).abs().max() <= 1e-4
    assert stats_compact.keep_counts == stats_mask.keep_counts


@pytest.mark.slow
def test_domain_switch_triggers_retrace_after_the_switch_only(smollm2, texts):
    model, _ = smollm2
    _, switch = run(model, texts["switch"], DartConfig(sparsity=0.5))
    _, homogeneous = run(model, texts["homogeneous"], DartConfig(sparsity=0.5))
    before = [p for p in switch.retrace_positions if p <= SWITCH]
    after = [p for p in switch.retrace_positions if p > SWITCH]
    assert len(after) >= 1
    assert len(before) <= 1
    assert homogeneous.retrace_count < switch.retrace_count
    assert all(sum(r.neurons_changed) > 0 for r in switch.retraces), "a re-trace must change the masks"


@pytest.mark.slow
def test_dart_follows_the_switch_better_than_static(smollm2, texts):
    """After the switch, the re-traced masks predict the new text better than the prompt's static mask."""
    model, _ = smollm2
    ids = texts["switch"]

    def nll(logits, lo, hi):
        logp = torch.log_softmax(logits[0, lo - 1:hi - 1].float(), dim=-1)
        return float(-logp.gather(-1, ids[0, lo:hi, None]).mean())

    dart, _ = run(model, ids, DartConfig(sparsity=0.5))
    static, _ = run(model, ids, DartConfig(sparsity=0.5, method="static"))
    assert nll(dart, SWITCH, END) < nll(static, SWITCH, END)
