"""The baselines run by the same engine: static, GRIFFIN, random, the calibrated wanda-static mask and the
TEAL/CATS-style per-token threshold, with their calibration files and the `dartprune calibrate` command."""
import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import LogitsProcessor, LogitsProcessorList

import dartprune
from dartprune import ConfigError, DartConfig
from dartprune.architectures import get_adapter
from dartprune.methods import METHODS
from dartprune.engine.budgets import keep_counts, pruning_ratios
from dartprune.calibration.collect import calibrate, text_windows
from dartprune.calibration.file import CalibrationError, check_sources_differ, load_calibration, wanda_scores
from dartprune.data import load_text
from dartprune.engine.weights import activations
from dartprune.engine.scoring import neuron_prior, top_neurons
from tests.conftest import MINI
from tests.helpers import HAIR_TRIGGER, assert_untouched, layout
from tests.tiny_models import FAMILIES, VOCAB, random_ids, tiny_model

CAL_PATH = MINI / "gutenberg" / "harbour.txt"
CAL_TEXT = load_text(CAL_PATH)
EVAL_TEXT = load_text(MINI / "gutenberg" / "kitchen.txt")
SAMPLES, SEQ_LEN = 8, 64
GRID = (0.0, 0.25, 0.5, 0.75)
DRIFTY = HAIR_TRIGGER  # re-traces at every window if the method follows drift


class ByteTokenizer:
    """Stands in for a tokenizer on the tiny models: one token per byte, BOS first when asked."""

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + b % (VOCAB - 3) for b in text.encode("utf-8")]
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)


def calibrated(model, method, path, **kwargs):
    return calibrate(model, ByteTokenizer(), method, CAL_TEXT, path, samples=SAMPLES, seq_len=SEQ_LEN,
                     sparsities=GRID, **kwargs)


@pytest.fixture(scope="module")
def windows():
    return text_windows(ByteTokenizer(), CAL_TEXT, SAMPLES, SEQ_LEN)


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    model = tiny_model("llama")
    folder = tmp_path_factory.mktemp("calibration")
    return {method: calibrated(model, method, folder / f"{method}.safetensors").path
            for method in ("wanda-static", "threshold")}


class KeptSnapshots(LogitsProcessor):
    """Called once per generated token, after the forward (and any re-trace): records row 0's kept indices."""

    def __init__(self, handle):
        self.handle = handle
        self.kept = []

    def __call__(self, input_ids, scores):
        self.kept.append(kept_sets(self.handle))
        return scores


def generate_with_snapshots(model, handle, ids, new_tokens=40):
    snapshots = KeptSnapshots(handle)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, logits_processor=LogitsProcessorList([snapshots]), pad_token_id=0)
    return snapshots.kept


def kept_sets(handle):
    engine = handle.engine
    return [engine.kept(0, layer) for layer in range(len(engine.layers))]


def same_masks(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def capture(model, ids, what="u"):
    """Dense activations per layer: u (input of the down projection) or x (input of the FFN), as [tokens, dim]."""
    adapter = get_adapter(model)
    captured, hooks = {}, []
    for i, layer in enumerate(adapter.layers()):
        module = adapter.down_proj(layer) if what == "u" else adapter.ffn_input_norm(layer)

        def hook(mod, args, output=None, i=i):
            value = args[0] if what == "u" else output
            captured.setdefault(i, []).append(value.detach().reshape(-1, value.shape[-1]).float())
        hooks.append(module.register_forward_pre_hook(hook) if what == "u" else module.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return [torch.cat(captured[i]) for i in range(len(captured))]


# ------------------------------------------------------------------------------------------- static masks
@pytest.mark.parametrize("method", ["static", "griffin", "random", "wanda-static"])
def test_static_masks_never_change_during_generation(method, llama_files):
    model = tiny_model("llama")
    ids = random_ids(1, 24, seed=3)
    config = DartConfig(method=method, sparsity=0.6, calibration_file=llama_files.get(method), **DRIFTY)
    with dartprune.attach(model, config) as handle:
        kept = generate_with_snapshots(model, handle, ids)
        stats = handle.stats()[0]
    assert len(kept) == 40
    assert all(same_masks(kept[0], k) for k in kept)
    assert stats.retrace_count == 0
    assert stats.tokens == 24 + 39


def test_dart_with_the_same_settings_does_change_its_mask():
    """The check above can fail: DART under the same drift settings re-traces and moves neurons."""
    model = tiny_model("llama")
    with dartprune.attach(model, DartConfig(method="dart", sparsity=0.6, **DRIFTY)) as handle:
        kept = generate_with_snapshots(model, handle, random_ids(1, 24, seed=3))
        assert handle.stats()[0].retrace_count > 0
    assert not same_masks(kept[0], kept[-1])


# ------------------------------------------------------------------------------------------- GRIFFIN
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_griffin_scores_follow_its_formula_with_uniform_budgets(family):
    model = tiny_model(family)
    ids = random_ids(1, 30, seed=5)
    u = capture(model, ids)
    sparsity = 0.55
    with dartprune.attach(model, DartConfig(method="griffin", sparsity=sparsity)) as handle:
        with torch.no_grad():
            model(ids)
        engine, keep = handle.engine, handle.stats()[0].keep_counts
        for layer, u_l in enumerate(u):
            expected = (u_l / u_l.norm(dim=-1, keepdim=True)).square().sum(dim=0).sqrt()
            torch.testing.assert_close(engine.scores(0, layer), expected, rtol=1e-5, atol=1e-7)
            assert torch.equal(engine.kept(0, layer), top_neurons(expected, keep[layer]))
        assert keep == [round((1 - sparsity) * size) for size in engine.sizes]
        assert len(set(keep)) == 1


# ------------------------------------------------------------------------------------------- priors
@pytest.mark.parametrize("prior", ["vocab-max", "vocab-mean"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_prior_multiplies_every_neurons_score(family, prior):
    """s_i x the neuron's static prior, computed here the brute-force way (the whole I x V matrix); a second
    sequence and a second engine on the same model find it in the cache."""
    model = tiny_model(family)
    prompts = [random_ids(1, 30, seed=5), random_ids(1, 20, seed=6)]
    activations_per_prompt = [capture(model, ids) for ids in prompts]
    adapter = get_adapter(model)
    downs = [adapter.ffn_parts(layer).down.detach().float().clone() for layer in adapter.layers()]
    embeddings = adapter.output_embeddings().detach().float()
    for _engine in range(2):
        with dartprune.attach(model, DartConfig(method="static", sparsity=0.5, prior=prior)) as handle:
            for ids, u in zip(prompts, activations_per_prompt):
                with torch.no_grad():
                    model(ids)
                engine, keep = handle.engine, handle.stats()[0].keep_counts
                for layer, (u_l, down) in enumerate(zip(u, downs)):
                    products = (embeddings @ down).abs()
                    weight = products.max(dim=0).values if prior == "vocab-max" else products.mean(dim=0)
                    expected = u_l.square().sum(dim=0).sqrt() * weight
                    torch.testing.assert_close(engine.scores(0, layer), expected, rtol=1e-5, atol=1e-7)
                    assert torch.equal(engine.kept(0, layer), top_neurons(expected, keep[layer]))


@pytest.mark.parametrize("prior", ["vocab-max", "vocab-mean"])
def test_the_vocabulary_prior_is_the_same_in_chunks(prior):
    torch.manual_seed(0)
    down, embeddings = torch.randn(16, 24), torch.randn(50, 16)
    torch.testing.assert_close(neuron_prior(down, embeddings, prior, chunk=7),
                               neuron_prior(down, embeddings, prior, chunk=4096), rtol=1e-6, atol=1e-6)


def test_an_unknown_prior_is_refused():
    with pytest.raises(ConfigError, match="prior"):
        DartConfig(prior="vocab")


# ------------------------------------------------------------------------------------------- random
def test_random_is_seeded_reproducible_and_prompt_independent():
    model = tiny_model("llama")

    def kept(seed, prompt_seed=0):
        with dartprune.attach(model, DartConfig(method="random", sparsity=0.5, seed=seed)) as handle:
            with torch.no_grad():
                model(random_ids(1, 12, seed=prompt_seed))
            return kept_sets(handle), handle.stats()[0].keep_counts

    first, keep = kept(7)
    again, _ = kept(7, prompt_seed=9)
    other, _ = kept(8)
    assert same_masks(first, again)
    assert all(not torch.equal(a, b) for a, b in zip(first, other))
    assert len(set(keep)) == 1
    assert all(not torch.equal(first[0], k) for k in first[1:])  # each layer draws its own neurons
    largest, _ = kept(2 ** 63 - 1)                               # the largest seed a --seed takes draws too
    assert all(not torch.equal(a, b) for a, b in zip(first, largest))
    assert same_masks(kept(np.int64(2 ** 63 - 1))[0], largest)  # a numpy integer is the same seed


# ------------------------------------------------------------------------------------------- wanda-static
def test_wanda_static_mask_is_the_formula_on_calibration_norms(llama_files, windows):
    model = tiny_model("llama")
    calibration = load_calibration(llama_files["wanda-static"])
    u = capture(model, windows, "u")
    x = capture(model, windows, "x")
    adapter = get_adapter(model)
    for layer, parts in enumerate(adapter.ffn_parts(m) for m in adapter.layers()):
        x_norm, u_norm = x[layer].norm(dim=0), u[layer].norm(dim=0)
        torch.testing.assert_close(calibration.wanda_norms(layer)[0], x_norm, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(calibration.wanda_norms(layer)[1], u_norm, rtol=1e-4, atol=1e-5)
        direct = torch.zeros(parts.intermediate_size)
        for i in range(parts.intermediate_size):  # neuron by neuron, as the docstring states it
            direct[i] = ((parts.gate[i].abs() * x_norm).sum() + (parts.up[i].abs() * x_norm).sum()
                         + (parts.down[:, i].abs() * u_norm[i]).sum())
        torch.testing.assert_close(wanda_scores(parts, x_norm, u_norm), direct, rtol=1e-5, atol=1e-5)
    expected = [wanda_scores(parts, *calibration.wanda_norms(layer))
                for layer, parts in enumerate(adapter.ffn_parts(m) for m in adapter.layers())]
    with dartprune.attach(model, DartConfig(method="wanda-static", sparsity=0.5, allocation="uniform",
                                            calibration_file=llama_files["wanda-static"])) as handle:
        with torch.no_grad():
            model(random_ids(1, 10))
        keep = handle.stats()[0].keep_counts
        for layer, scores in enumerate(expected):
            assert torch.equal(handle.engine.kept(0, layer), top_neurons(scores, keep[layer]))
        assert len(set(keep)) == 1


@pytest.mark.parametrize("allocation", ["dart", "uniform"])
def test_wanda_static_reloads_the_same_mask_for_every_prompt(allocation, llama_files, tmp_path):
    model = tiny_model("llama")
    remade = calibrated(model, "wanda-static", tmp_path / "again.safetensors").path

    def kept(file, prompt_seed):
        config = DartConfig(method="wanda-static", sparsity=0.6, allocation=allocation, calibration_file=file)
        with dartprune.attach(model, config) as handle:
            with torch.no_grad():
                model(random_ids(1, 8 + prompt_seed, seed=prompt_seed))
            return kept_sets(handle), handle.stats()[0].keep_counts

    first, keep = kept(llama_files["wanda-static"], 0)
    for file, prompt_seed in ((llama_files["wanda-static"], 4), (remade, 11)):
        again, keep_again = kept(file, prompt_seed)
        assert same_masks(first, again) and keep == keep_again
    assert abs(sum(1 - k / 96 for k in keep) / len(keep) - 0.6) <= 1 / 96
    assert (len(set(keep)) == 1) == (allocation == "uniform")
    # DART budgets come from the layer importances measured on the calibration text, not from the prompt
    importance = load_calibration(llama_files["wanda-static"]).importance("residual")
    config = DartConfig(sparsity=0.6, allocation=allocation)
    assert keep == keep_counts(pruning_ratios(importance, 0.6, config), [96] * 4)


def test_calibrated_methods_refuse_another_model_or_method(llama_files, tmp_path):
    other_seed = tiny_model("llama", seed=1)
    with pytest.raises(CalibrationError, match="another model: same llama sizes but different weights"):
        dartprune.attach(other_seed, DartConfig(method="wanda-static", calibration_file=llama_files["wanda-static"]))
    with pytest.raises(CalibrationError, match="another model: model_type"):
        dartprune.attach(tiny_model("gpt2"), DartConfig(method="threshold", calibration_file=llama_files["threshold"]))
    model = tiny_model("llama")
    before = layout(model)
    with pytest.raises(CalibrationError, match="made for method 'threshold', not 'wanda-static'"):
        dartprune.attach(model, DartConfig(method="wanda-static", calibration_file=llama_files["threshold"]))
    with pytest.raises(CalibrationError, match="made for method 'wanda-static', not 'threshold'"):
        dartprune.attach(model, DartConfig(method="threshold", calibration_file=llama_files["wanda-static"]))
    with pytest.raises(CalibrationError, match="not found"):
        dartprune.attach(model, DartConfig(method="threshold", calibration_file=str(tmp_path / "missing")))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CalibrationError, match="not a calibration file"):
        dartprune.attach(model, DartConfig(method="threshold", calibration_file=str(tmp_path / "junk.safetensors")))
    with pytest.raises(ConfigError, match="needs calibration_file"):
        DartConfig(method="wanda-static")
    assert_untouched(model, before)                           # a refused attach leaves nothing behind
    # the same weights in bfloat16 are the same model
    with dartprune.attach(tiny_model("llama").to(torch.bfloat16),
                          DartConfig(method="wanda-static", calibration_file=llama_files["wanda-static"])):
        pass


# ------------------------------------------------------------------------------------------- threshold
def test_threshold_zeroes_the_calibrated_fraction_on_the_calibration_text(llama_files, windows):
    model = tiny_model("llama")
    calibration = load_calibration(llama_files["threshold"])
    assert calibration.sparsities == list(GRID)
    u = capture(model, windows)
    for s in (0.25, 0.5, 0.75):
        taus = calibration.thresholds(s)
        # the quantiles themselves, on the dense activations they were read from
        for layer, u_l in enumerate(u):
            assert abs(float((u_l.abs() < taus[layer]).float().mean()) - s) < 0.005
        # through the engine: every calibration token pruned, fraction zeroed reported by handle.stats()
        config = DartConfig(method="threshold", sparsity=s, calibration_file=llama_files["threshold"],
                            prune_prefill=True)
        with dartprune.attach(model, config) as handle:
            with torch.no_grad():
                model(windows)
            executed = [st.executed_sparsity for st in handle.stats()]
        assert abs(sum(executed) / len(executed) - s) <= 0.02, executed


def test_threshold_refuses_a_sparsity_it_was_not_calibrated_for(llama_files):
    with pytest.raises(CalibrationError, match=r"no thresholds for sparsity 0.3; it has \[0.0, 0.25, 0.5, 0.75\]"):
        dartprune.attach(tiny_model("llama"), DartConfig(method="threshold", sparsity=0.3,
                                                         calibration_file=llama_files["threshold"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrated_methods_on_every_family(family, tmp_path, windows):
    model = tiny_model(family)
    with torch.no_grad():
        reference = model(windows[:2]).logits
    files = {m: calibrated(model, m, tmp_path / f"{m}.safetensors").path for m in ("wanda-static", "threshold")}
    config = DartConfig(method="threshold", sparsity=0.5, calibration_file=files["threshold"], prune_prefill=True)
    with dartprune.attach(model, config) as handle:
        with torch.no_grad():
            model(windows)
        executed = sum(st.executed_sparsity for st in handle.stats()) / SAMPLES
    zeros = load_calibration(files["threshold"]).tensors["zero_fraction"]
    expected = float(zeros.clamp_min(0.5).mean())  # ReLU families: a threshold cannot zero fewer than the zeros
    assert abs(executed - expected) <= 0.02, (executed, zeros)
    config = DartConfig(method="wanda-static", sparsity=0.5, calibration_file=files["wanda-static"])
    with dartprune.attach(model, config) as handle:
        kept = generate_with_snapshots(model, handle, windows[:1, :16], new_tokens=6)
    assert all(same_masks(kept[0], k) for k in kept)
    with torch.no_grad():
        assert torch.equal(model(windows[:2]).logits, reference)  # calibration and detach leave the model as it was


# ------------------------------------------------------------------------------------------- stats
def test_every_method_reports_executed_sparsity_through_handle_stats(llama_files):
    model = tiny_model("llama")
    prompt, steps, sparsity = 12, 10, 0.5
    ids = random_ids(1, prompt + steps, seed=2)
    sizes = [96] * 4
    for method in sorted(METHODS):
        config = DartConfig(method=method, sparsity=sparsity, calibration_file=llama_files.get(method))
        with dartprune.attach(model, config) as handle:
            seen = []
            engine = handle.engine
            hooks = [engine.adapter.ffn(layer).register_forward_pre_hook(
                lambda mod, args: seen.append((mod.index, engine.parts[mod.index], args[0])))
                for layer in engine.layers] if engine.prunes else []
            with torch.no_grad():
                out = model(ids[:, :prompt], use_cache=True)
                for t in range(prompt, prompt + steps):
                    out = model(ids[:, t:t + 1], cache=out.past_key_values, use_cache=True)
            for h in hooks:
                h.remove()
            stats = handle.stats()
        assert len(stats) == 1 and stats[0].method == method and stats[0].tokens == prompt + steps
        executed = stats[0].executed_sparsity
        if method == "dense":
            assert executed == 0.0
        elif method == "threshold":
            ran = sum(float(engine.method.active(layer, activations(parts, x)).sum())
                      for layer, parts, x in seen if x.shape[1] == 1)
            expected = 1 - (prompt * sum(sizes) + ran) / ((prompt + steps) * sum(sizes))
            assert executed == pytest.approx(expected, abs=1e-9)
            assert 0.3 * steps / (prompt + steps) < executed < 0.7 * steps / (prompt + steps)
        else:
            removed = 1 - sum(stats[0].keep_counts) / sum(sizes)
            assert removed == pytest.approx(sparsity, abs=1 / 96)
            assert executed == pytest.approx(removed * steps / (prompt + steps), abs=1e-9)


def test_threshold_stats_count_each_row_and_skip_padding(llama_files):
    model = tiny_model("llama")
    ids = random_ids(2, 10, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    config = DartConfig(method="threshold", sparsity=0.5, calibration_file=llama_files["threshold"],
                        prune_prefill=True)
    with dartprune.attach(model, config) as handle:
        with torch.no_grad():
            model(ids, attention_mask=mask)
        stats = handle.stats()
    assert [s.tokens for s in stats] == [10, 6]
    assert all(0.2 < s.executed_sparsity < 0.8 for s in stats)
    assert stats[0].executed_sparsity != stats[1].executed_sparsity


# ------------------------------------------------------------------------------------------- the file and CLI
def test_calibration_file_records_model_text_and_sizes(llama_files):
    with safe_open(llama_files["threshold"], framework="pt") as f:
        header = json.loads(f.metadata()["dartprune"])
    assert header["method"] == "threshold"
    assert header["model"]["model_type"] == "llama" and header["model"]["num_layers"] == 4
    assert header["model"]["hidden_size"] == 32 and header["model"]["intermediate_sizes"] == [96] * 4
    assert len(header["model"]["weights_sha256"]) == 64
    assert header["text"] == {"name": "harbour.txt", "sha256": CAL_TEXT.sha256}
    assert "/" not in json.dumps(header["model"]["name_or_path"]) and "/" not in header["text"]["name"]
    assert (header["samples"], header["seq_len"], header["tokens"]) == (SAMPLES, SEQ_LEN, SAMPLES * SEQ_LEN)
    assert header["sparsities"] == list(GRID)
    assert Path(llama_files["threshold"]).stat().st_size < 20_000
    wanda = load_calibration(llama_files["wanda-static"])
    assert wanda.text_sha256 == CAL_TEXT.sha256
    check_sources_differ(wanda, {EVAL_TEXT.name: EVAL_TEXT.sha256, "wikitext2": None,
                                 CAL_TEXT.name: EVAL_TEXT.sha256})   # same name, not text
    with pytest.raises(CalibrationError, match="is the calibration text"):
        check_sources_differ(wanda, {"renamed.txt": CAL_TEXT.sha256})
    with pytest.raises(CalibrationError, match="is the calibration text"):
        check_sources_differ(wanda, {CAL_TEXT.name: None})


def test_text_windows_are_evenly_spread_and_do_not_overlap(windows):
    assert windows.shape == (SAMPLES, SEQ_LEN)
    assert bool((windows[:, 0] == 1).all())  # the tokenizer's BOS starts each window
    ids = ByteTokenizer()(CAL_TEXT.text, add_special_tokens=False).input_ids
    assert windows[-1, 1:].tolist() != windows[0, 1:].tolist()
    with pytest.raises(ValueError, match="fewer than"):
        text_windows(ByteTokenizer(), CAL_TEXT, len(ids) // 10, 12)


def test_calibrate_command(tmp_path, monkeypatch, capsys):
    from dartprune import models
    from dartprune.cli import calibrate as cli
    monkeypatch.setattr(models, "load_model", lambda name, dtype="float32", device="cpu": (
        tiny_model("llama"), ByteTokenizer()))
    parser = argparse.ArgumentParser(prog="dartprune")
    cli.register(parser.add_subparsers(dest="command").add_parser)
    out = tmp_path / "t.safetensors"
    args = parser.parse_args(["calibrate", "--method", "threshold", "--model", "tiny", "--text", str(CAL_PATH),
                              "--samples", "4", "--seq-len", "32", "--sparsities", "0.5,0.25", "--out", str(out),
                              "--no-progress"])
    assert args.run(args) == 0
    calibration = load_calibration(out)
    assert calibration.method == "threshold" and calibration.sparsities == [0.25, 0.5]
    assert (calibration.meta["samples"], calibration.meta["seq_len"]) == (4, 32)
    assert "threshold calibration of llama (4 layers) on 4 x 32 tokens" in capsys.readouterr().err
    with dartprune.attach(tiny_model("llama"), DartConfig(method="threshold", sparsity=0.25,
                                                          calibration_file=str(out))):
        pass
    bad = parser.parse_args(["calibrate", "--method", "threshold", "--out", str(out), "--sparsities", "0.5,1.2"])
    with pytest.raises(ValueError, match="--sparsities"):
        bad.run(bad)
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--method", "dart", "--out", str(out)])
    common = ["calibrate", "--method", "threshold", "--model", "tiny", "--text", str(CAL_PATH), "--no-progress"]
    folder = parser.parse_args(common + ["--out", str(tmp_path)])
    with pytest.raises(ValueError, match="is a folder"):
        folder.run(folder)
    too_long = parser.parse_args(common + ["--seq-len", "5000", "--out", str(tmp_path / "long.safetensors")])
    with pytest.raises(ValueError, match="the model's context is 4096"):
        too_long.run(too_long)
    assert not (tmp_path / "long.safetensors").exists()
    shown = parser.parse_args(common[:-1] + ["--samples", "2", "--seq-len", "16", "--out", str(out)])
    for value, bar in (("1", False), ("0", True)):        # DARTPRUNE_NO_PROGRESS=1 turns the bar off, 0 does not
        monkeypatch.setenv("DARTPRUNE_NO_PROGRESS", value)
        assert shown.run(shown) == 0
        assert ("calibrating threshold" in capsys.readouterr().err) == bar


# ------------------------------------------------------------------------------------------- real SmolLM2
@pytest.fixture(scope="module")
def smollm2_files(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("smollm2-calibration")
    text = load_text("python:argparse")   # real text every machine has
    return {
        "wanda-static": calibrate(model, tokenizer, "wanda-static", text, folder / "w.safetensors", samples=2,
                                  seq_len=64).path,
        "threshold": calibrate(model, tokenizer, "threshold", text, folder / "t.safetensors", samples=2,
                               seq_len=128, sparsities=(0.5,)).path,
        "windows": text_windows(tokenizer, text, 2, 128),
    }


def test_smollm2_threshold_zeroes_the_calibrated_fraction(smollm2, smollm2_files):
    model, _ = smollm2
    config = DartConfig(method="threshold", sparsity=0.5, calibration_file=smollm2_files["threshold"],
                        prune_prefill=True)
    with dartprune.attach(model, config) as handle:
        with torch.no_grad():
            model(smollm2_files["windows"])
        executed = [s.executed_sparsity for s in handle.stats()]
    assert abs(sum(executed) / len(executed) - 0.5) <= 0.02, executed


@pytest.mark.parametrize("method", ["wanda-static", "static", "griffin"])
def test_smollm2_masks_stay_fixed_through_generation(smollm2, smollm2_files, method):
    model, tokenizer = smollm2
    ids = tokenizer("The whale swam slowly past the ship, and the sailors", return_tensors="pt").input_ids
    config = DartConfig(method=method, sparsity=0.5, calibration_file=smollm2_files.get(method), **DRIFTY)
    with dartprune.attach(model, config) as handle:
        kept = generate_with_snapshots(model, handle, ids)
        stats = handle.stats()[0]
    assert len(kept) == 40 and all(same_masks(kept[0], k) for k in kept)
    assert stats.executed_sparsity == pytest.approx(
        (1 - sum(stats.keep_counts) / sum(stats.intermediate_sizes)) * 39 / (ids.shape[1] + 39), abs=1e-9)
    if method == "griffin":
        assert len(set(stats.keep_counts)) == 1


def test_smollm2_wanda_static_refuses_the_threshold_file(smollm2, smollm2_files):
    model, _ = smollm2
    with pytest.raises(CalibrationError, match="made for method 'threshold'"):
        dartprune.attach(model, DartConfig(method="wanda-static", calibration_file=smollm2_files["threshold"]))
    with pytest.raises(CalibrationError, match="another model"):
        dartprune.attach(tiny_model("llama"), DartConfig(method="wanda-static",
                                                         calibration_file=smollm2_files["wanda-static"]))
