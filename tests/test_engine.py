import dataclasses
import math

import pytest
import torch

import dartprune
from dartprune import ConfigError, DartConfig
from dartprune.architectures import get_adapter
from dartprune.engine.config import parse_settings
from dartprune.engine.budgets import depth_protection, keep_counts, layer_importance, pruning_ratios
from dartprune.decode.model import NativeModel
from dartprune.engine import Engine
from dartprune.engine.phase import Phase
from dartprune.engine.drift import PaperDetector
from dartprune.engine.weights import PrefixFFN, activations, masked_ffn
from dartprune.engine.scoring import same_length_groups, top_neurons, top_neurons_rows
from tests.helpers import HAIR_TRIGGER, assert_untouched, layout, teacher_forced_logits
from tests.tiny_models import FAMILIES, INTERMEDIATE, LAYERS, random_ids, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_sparsity_is_bit_identical(family):
    model = tiny_model(family)
    ids = random_ids(1, 12)
    dense = teacher_forced_logits(model, ids, prefix=6)
    with dartprune.attach(model, DartConfig(sparsity=0.0)):
        pruned = teacher_forced_logits(model, ids, prefix=6)
    assert torch.equal(dense, pruned)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prune_prefill", [False, True])
def test_compact_path_matches_mask_path(family, prune_prefill):
    model = tiny_model(family)
    ids = random_ids(1, 40, seed=1)
    results = {}
    for path in ("compact", "mask"):
        with dartprune.attach(model, DartConfig(sparsity=0.6, path=path, prune_prefill=prune_prefill,
                                                **HAIR_TRIGGER)) as handle:
            results[path] = teacher_forced_logits(model, ids, prefix=12)
            stats = handle.stats()[0]
        results[path + "_retraces"] = stats.retrace_positions
    dense = teacher_forced_logits(model, ids, prefix=12)
    assert (results["compact"] - results["mask"]).abs().max() <= 1e-4
    assert results["compact_retraces"] == results["mask_retraces"]
    assert not torch.allclose(results["compact"][:, 12:], dense[:, 12:], atol=1e-3)
    prefill_equal = torch.equal(results["compact"][:, :12], dense[:, :12])
    assert prefill_equal != prune_prefill


def test_detach_restores_model_and_weights():
    model = tiny_model("llama")
    before = layout(model)
    modules_before = [type(m) for m in model.modules()]
    ids = random_ids(1, 16)
    dense = model.generate(ids, max_new_tokens=12, do_sample=False)
    handle = dartprune.attach(model, DartConfig(sparsity=0.7))
    pruned = model.generate(ids, max_new_tokens=12, do_sample=False)
    handle.detach()
    after = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(dense, after)
    assert not torch.equal(dense, pruned)
    assert [type(m) for m in model.modules()] == modules_before
    assert_untouched(model, before)
    assert "generate" not in vars(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_over_contiguous_neuron_rows_and_closes_to_its_own_layout(family):
    """Each FFN weight is laid out one contiguous row per neuron while an engine prunes (GPT-2's Conv1D up
    projection, stored [hidden, I], had stayed strided: a strided prefix read, and swaps through PyTorch), so every
    layer's swaps are the compiled ones where they build; closing gives back every tensor with its own strides."""
    from dartprune.engine import weights
    model = tiny_model(family)
    before = layout(model)
    ids = random_ids(1, 16)
    dense = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with dartprune.attach(model, DartConfig(sparsity=0.5)) as handle:
        for prefix in handle.engine.prefix:
            rows = [prefix.parts.gate, prefix.parts.up, prefix.parts.down.t()]
            assert all(t.is_contiguous() for t in rows if t is not None)
            assert prefix.uses_compiled_swap() == (weights.swap_library() is not None)
        pruned = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not torch.equal(pruned, dense)
    assert_untouched(model, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", FAMILIES)
def test_in_reduced_precision_every_ffn_weight_keeps_its_layout_and_moves_through_the_compiled_swap(family, dtype):
    """On a CPU, PyTorch's bfloat16 and float16 matmuls over a weight laid out neuron-major are several times slower
    than over the row-major one (dense included), so no weight is laid out anew there: the down projection's neurons
    move as columns, still through the compiled routines, and each layer's pruned prefix computes what the masked
    dense FFN does. Closing gives back every tensor as it was."""
    from dartprune.engine import weights
    model = tiny_model(family, dtype=dtype)
    before = layout(model)
    ids = random_ids(1, 16)
    with dartprune.attach(model, DartConfig(sparsity=0.5)) as handle:
        assert all(value.stride() == before[name][1] for name, value in model.state_dict().items())
        cache = model(ids, use_cache=True).past_key_values   # the prompt: traced, then the kept neurons moved in
        model(random_ids(1, 16, seed=3), cache=cache, use_cache=True)  # other text into the ring
        kept = [prefix.kept() for prefix in handle.engine.prefix]
        record = handle.engine.retrace(0)          # scored from the ring (x W^T in reduced precision), swapped
        assert record is not None and sum(record.neurons_changed) > 0
        assert any(not torch.equal(k, prefix.kept()) for k, prefix in zip(kept, handle.engine.prefix))
        for i, prefix in enumerate(handle.engine.prefix):
            assert prefix.uses_compiled_swap() == (weights.swap_library() is not None)
            assert prefix.k < prefix.size
            assert not torch.equal(prefix.order, torch.arange(prefix.size, dtype=torch.int32))
            x = torch.randn(3, prefix.parts.up.shape[1], generator=torch.Generator().manual_seed(i)).to(dtype)
            expected = weights.masked_ffn(prefix.parts, x, prefix.mask(prefix.kept(), dtype))
            torch.testing.assert_close(prefix.forward(x), expected, rtol=2e-2, atol=2e-2)
            ring = torch.randn(16, x.shape[1], generator=torch.Generator().manual_seed(i)).to(dtype)
            in_float32 = dataclasses.replace(prefix.parts, **{
                name: getattr(prefix.parts, name).float() for name in ("gate", "up", "up_bias", "down", "down_bias")
                if getattr(prefix.parts, name) is not None})
            torch.testing.assert_close(prefix.activations(ring).float(), weights.activations(in_float32, ring.float()),
                                       rtol=3e-2, atol=3e-2)
    assert_untouched(model, before)


@pytest.mark.parametrize("flags, onednn, native", [
    (frozenset(), True, False), (frozenset({"avx2"}), True, False), (frozenset({"avx512_bf16"}), True, True),
    (frozenset({"amx_bf16"}), True, True), (frozenset({"avx512_bf16"}), False, False)])
def test_a_retrace_multiplies_in_bfloat16_only_on_a_cpu_with_the_instructions_for_it(monkeypatch, flags, onednn,
                                                                                    native):
    """A re-trace's activations of bfloat16 weights: on a CPU with AVX-512 BF16 or AMX and a PyTorch with oneDNN,
    PyTorch's bfloat16 product (W x^T of the input rounded to bfloat16); elsewhere the weights widened to float32
    (x W^T). Float16 always widens."""
    from dartprune.engine import weights
    monkeypatch.setattr(weights, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)
    assert weights.native_reduced_matmul(torch.bfloat16) == native
    assert not weights.native_reduced_matmul(torch.float16) and not weights.native_reduced_matmul(torch.float32)
    model = tiny_model("llama", dtype=torch.bfloat16)
    parts = get_adapter(model).ffn_parts(get_adapter(model).layers()[0])
    prefix = PrefixFFN(parts)
    x = torch.randn(16, parts.up.shape[1], generator=torch.Generator().manual_seed(0))
    got = prefix.activations(x)
    if native:
        xb = x.bfloat16().t()
        want = (parts.act(torch.mm(parts.gate, xb)) * torch.mm(parts.up, xb)).t()
        assert got.dtype == torch.bfloat16
    else:
        want = activations(dataclasses.replace(parts, gate=parts.gate.float(), up=parts.up.float()), x)
        assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_a_refused_attach_leaves_the_model_as_it_was():
    """Settings found wrong only against the model (a monitored layer it does not have) are refused before any
    weight is laid out anew; the model can then be attached and detached as usual."""
    model = tiny_model("llama")
    before = layout(model)
    with pytest.raises(ConfigError, match="monitored layer 50 is out of range"):
        dartprune.attach(model, DartConfig(sparsity=0.5, monitored_layers=(50,)))
    assert_untouched(model, before)
    with dartprune.attach(model, DartConfig(sparsity=0.5)):
        pass
    assert_untouched(model, before)


def test_attached_generate_ends_its_sequence_and_a_continued_generate_resumes_it():
    """After `model.generate` returns the weights are the model's own again (the next prompt has nothing to move
    back), the next call gives the same tokens, and a generate that continues the cache runs as if the sequence
    had never ended (logits equal to one call that generates the whole reply)."""
    model = tiny_model("llama")
    before = [(p, p.detach().clone()) for p in model.parameters()]
    ids = random_ids(1, 16)
    options = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)
    with dartprune.attach(model, DartConfig(sparsity=0.5, **HAIR_TRIGGER)) as handle:
        whole = model.generate(ids, max_new_tokens=20, **options)
        assert handle.stats()[0].retraces and all(torch.equal(p, copy) for p, copy in before)
        first = model.generate(ids, max_new_tokens=10, **options)
        assert torch.equal(first.sequences, whole.sequences[:, :26])
        assert all(torch.equal(p, copy) for p, copy in before)
        rest = model.generate(first.sequences, cache=first.past_key_values, max_new_tokens=10, **options)
        assert torch.equal(rest.sequences, whole.sequences)
        for a, b in zip(first.logits + rest.logits, whole.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert all(torch.equal(p, copy) for p, copy in before)
    assert "generate" not in vars(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_attached_model_saves_and_loads_as_the_model_it_is(tmp_path, family):
    """Every family, OPT included, whose FFN is two modules of the layer itself (its keys had come out as
    fc1.fc1.* and fc1.fc2.*, which reloaded as random FFN weights)."""
    from transformers import AutoModelForCausalLM
    model = tiny_model(family)
    keys = list(model.state_dict())
    ids = random_ids(1, 12)
    with torch.no_grad():
        reference = model(ids).logits
    own = {k: v.clone() for k, v in model.state_dict().items()}    # copies: the attached model permutes in place
    adapter = get_adapter(model)
    layer = adapter.layers()[1]
    ffn = adapter.ffn(layer)                       # OPT's FFN is two modules of the layer, not one of its children
    slot = next((name for name, child in layer.named_children() if child is ffn), None)
    ffn_own = {k: v.clone() for k, v in ffn.state_dict().items()}
    with dartprune.attach(model, DartConfig(sparsity=0.5)), torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert list(model.state_dict()) == keys                       # the same keys, in the same order
        out = model(ids[:, :8], use_cache=True)                        # mid-sequence: the neurons are permuted
        prefix = model.base_model_prefix + "."
        assert all(torch.equal(v, own[prefix + k]) for k, v in model.base_model.state_dict().items())  # a part's
        out = model(ids[:, :8], use_cache=True)
        if slot is not None:                                            # the FFN module's own, as without dartprune
            assert any(not torch.equal(p, v) for p, v in zip(getattr(layer, slot).parameters(), ffn_own.values()))
            state = getattr(layer, slot).state_dict()
            assert list(state) == list(ffn_own) and all(torch.equal(state[k], v) for k, v in ffn_own.items())
            getattr(layer, slot).load_state_dict(ffn_own)
            with pytest.raises(RuntimeError, match="assign=True"):
                getattr(layer, slot).load_state_dict(ffn_own, assign=True)
        out = model(ids[:, :8], use_cache=True)
        state = model.state_dict()
        assert all(torch.equal(state[k], own[k]) for k in keys)       # ... but a state dict has them in order
        continued = model(ids[:, 8:9], cache=out.past_key_values, use_cache=True).logits  # the sequence goes on
        assert torch.isfinite(continued).all()
        model.save_pretrained(tmp_path)
        other = tiny_model(family, seed=7)
        model.load_state_dict(other.state_dict())         # the original's keys load into the attached model
        with pytest.raises(RuntimeError, match="assign=True"):
            model.load_state_dict(other.state_dict(), assign=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference)


@pytest.mark.parametrize("where", ["attach", "generator"])
def test_a_failure_after_the_engine_is_built_leaves_the_model_as_it_was(monkeypatch, where):
    """attach and Generator build the engine (which lays the weights out anew and claims the model) and then more;
    if that fails, the model is restored and free for the next engine."""
    import importlib
    from dartprune.decode.generate import Generator
    from tests.tiny_models import tiny_tokenizer
    attach_module = importlib.import_module("dartprune.engine.attach")     # the package exports `attach` itself
    generate_module = importlib.import_module("dartprune.decode.generate")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    model = tiny_model("llama")
    before = layout(model)
    if where == "attach":
        monkeypatch.setattr(attach_module, "FFNTaps", fail)
        build = lambda: dartprune.attach(model, DartConfig(sparsity=0.5))   # noqa: E731
    else:
        monkeypatch.setattr(generate_module, "NativeModel", fail)
        build = lambda: Generator(model, tiny_tokenizer(), DartConfig(sparsity=0.5), loop="native")   # noqa: E731
    with pytest.raises(OSError, match="disk full"):
        build()
    assert_untouched(model, before)
    Engine(model, DartConfig(sparsity=0.5)).close()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_down_projection_is_neuron_major_while_pruning_in_every_family(family):
    """The compact path reads a prefix of the down projection's columns: each neuron's column contiguous. GPT-2's
    Conv1D stores it that way already (it had been turned the other way round)."""
    model = tiny_model(family)
    before = layout(model)
    engine = Engine(model, DartConfig(sparsity=0.5))
    try:
        assert all(p.down.t().is_contiguous() for p in engine.parts)
    finally:
        engine.close()
    assert_untouched(model, before)


@pytest.mark.parametrize("settings", [dict(min_trace_tokens=10),
                                      dict(retrace="dense-steps", dense_steps=3, detector="paper", window=5,
                                           monitored_layers=(-1,), trigger_count=1, cooldown=0)])
def test_a_row_that_traces_dense_does_not_change_the_other_rows_of_the_batch(settings):
    """A short left-padded prompt still tracing, or a dense-steps re-trace of one row: the other rows stay on their
    masks in that forward (all rows had run dense), so each row generates and counts as it would alone."""
    model = tiny_model("llama")
    ids = random_ids(2, 14, seed=21)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0                                              # row 1: a 5-token prompt
    options = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    config = DartConfig(sparsity=0.5, path="mask", **settings)
    with dartprune.attach(model, config) as handle:
        batch = model.generate(ids, attention_mask=mask, **options)
        together = handle.stats()
        for row in (0, 1):
            alone = model.generate(ids[row:row + 1, 9 * row:], **options)
            assert torch.equal(batch[row, 14:], alone[0, 14 - 9 * row:])
            [stats] = handle.stats()
            assert together[row].executed_sparsity == pytest.approx(stats.executed_sparsity)
            assert together[row].retrace_positions == stats.retrace_positions
    assert together[0].retrace_positions != together[1].retrace_positions or "dense_steps" not in settings
    assert together[1].retrace_count or "dense_steps" not in settings
    assert together[0].executed_sparsity != pytest.approx(together[1].executed_sparsity)


def test_prune_prefill_runs_a_prompt_too_short_to_trace_from_as_without_it():
    """A prompt shorter than min_trace_tokens has no masks to run on: it runs dense and traced once, as without
    prune_prefill (it had been traced twice, by the tracing pass and by the prompt's own forward)."""
    model = tiny_model("llama")
    ids = random_ids(1, 8, seed=3)
    runs = []
    for prune_prefill in (False, True):
        with dartprune.attach(model, DartConfig(sparsity=0.5, min_trace_tokens=20, prune_prefill=prune_prefill)) as h:
            out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
            runs.append((out, h.stats()[0]))
    (plain, plain_stats), (pruned, pruned_stats) = runs
    assert torch.equal(plain, pruned)
    assert pruned_stats.executed_sparsity == plain_stats.executed_sparsity
    assert pruned_stats.retrace_positions == plain_stats.retrace_positions


def test_continuing_a_cache_after_reset_says_no_sequence_is_open():
    model = tiny_model("llama")
    ids = random_ids(1, 12)
    with dartprune.attach(model, DartConfig(sparsity=0.5)) as handle, torch.no_grad():
        out = model(input_ids=ids[:, :8], use_cache=True)
        handle.reset()
        with pytest.raises(RuntimeError, match="continues a sequence, but none is open"):
            model(input_ids=ids[:, 8:9], cache=out.past_key_values, use_cache=True)


def test_attached_generate_without_the_cache_is_refused():
    """Without a KV cache every step would be a new, dense prompt: a silently unpruned answer."""
    from transformers import GenerationConfig
    model = tiny_model("llama")
    with dartprune.attach(model, DartConfig(sparsity=0.5)) as handle:
        for options in ({"use_cache": False}, {"generation_config": GenerationConfig(use_cache=False)}):
            with pytest.raises(ValueError, match="without it \\(use_cache=False\\) every step is a new prompt"):
                model.generate(random_ids(1, 8), max_new_tokens=3, do_sample=False, **options)
        assert not handle.stats()
        model.generate(random_ids(1, 8), max_new_tokens=3, do_sample=False)
        assert handle.stats()[0].executed_sparsity > 0
    with dartprune.attach(model, DartConfig(sparsity=0.5, prune_prefill=True)) as handle:    # prompts pruned too
        model.generate(random_ids(1, 8), max_new_tokens=3, do_sample=False, use_cache=False)
        # the last step is a prompt of 10 tokens, traced in a dense pass and then run on the masks: more FFN work
        # than one dense pass, which executed sparsity says
        stats = handle.stats()[0]
        assert stats.tokens == 10
        assert stats.executed_sparsity == pytest.approx(-sum(stats.keep_counts) / sum(stats.intermediate_sizes))


def test_attached_generate_refuses_modes_that_reorder_rows_or_guess_tokens():
    """Beam search reorders rows, which DART's per-row state does not follow (each row would go on re-tracing from
    another beam's tokens); a static mask does not change while generating, so beam search keeps it. Assisted and
    prompt-lookup decoding bring guessed tokens with the prompt, which every method would trace as the prompt."""
    from transformers import GenerationConfig
    model = tiny_model("llama")
    ids = random_ids(1, 24)
    speculative = (({"prompt_lookup_num_tokens": 3}, "prompt lookup"),
                   ({"assistant_model": tiny_model("llama", seed=1)}, "assisted decoding"))
    with dartprune.attach(model, DartConfig(sparsity=0.5)) as handle:
        for options in ({"num_beams": 3}, {"generation_config": GenerationConfig(num_beams=2, max_new_tokens=4)}):
            with pytest.raises(ValueError, match="beam search .* is not supported with method 'dart'"):
                model.generate(ids, max_new_tokens=4, do_sample=False, **options)
        with pytest.raises(ValueError, match="beam search .* is not supported with method 'dart'"):   # by place
            model.generate(ids, GenerationConfig(num_beams=2, max_new_tokens=4))
        for options, what in speculative:
            with pytest.raises(ValueError, match=f"{what} .* is not supported under dartprune"):
                model.generate(ids, max_new_tokens=4, do_sample=False, **options)
        assert not handle.stats()
    with dartprune.attach(model, DartConfig(method="static", sparsity=0.5)) as handle:
        for options, what in speculative:       # the guessed tokens would be traced as the prompt's
            with pytest.raises(ValueError, match=f"{what} .* is not supported under dartprune"):
                model.generate(ids, max_new_tokens=4, do_sample=False, **options)
        short_model = tiny_model("llama")
        with dartprune.attach(short_model, DartConfig(method="static", sparsity=0.5, min_trace_tokens=40)):
            embeds = short_model.get_input_embeddings()(ids)
            for prompt in ({"input_ids": ids}, {"inputs_embeds": embeds}):
                with pytest.raises(ValueError, match="beam search needs every prompt to bring min_trace_tokens = 40"):
                    short_model.generate(**prompt, max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
        out = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0)
        assert out.shape == (1, 30)
        rows = handle.stats()
        assert len(rows) == 3 and all(r.executed_sparsity > 0 for r in rows)


def test_attach_keeps_a_generate_of_the_users_and_wraps_nothing_where_nothing_prunes():
    model = tiny_model("llama")
    calls = []

    def own_generate(*args, **kwargs):
        calls.append(args)
        return type(model).generate(model, *args, **kwargs)

    model.generate = own_generate
    with dartprune.attach(model, DartConfig(sparsity=0.5)):
        assert model.generate is not own_generate and model.generate.__wrapped__ is own_generate
        model.generate(random_ids(1, 8), max_new_tokens=2, do_sample=False)
        assert len(calls) == 1
    assert model.generate is own_generate
    del model.generate
    with dartprune.attach(model, DartConfig(sparsity=0.0)):
        assert "generate" not in vars(model)


def test_attach_twice_is_refused():
    model = tiny_model("llama")
    handle = dartprune.attach(model, DartConfig())
    with pytest.raises(RuntimeError, match="already attached"):
        dartprune.attach(model, DartConfig())
    handle.detach()
    dartprune.attach(model, DartConfig()).detach()


def test_second_pruning_engine_on_one_model_is_refused_until_the_first_closes():
    model = tiny_model("llama")
    first = Engine(model, DartConfig(sparsity=0.5))
    Engine(model, DartConfig(sparsity=0.0)).close()          # prunes nothing: touches no weight, allowed
    with pytest.raises(RuntimeError, match="another dartprune Engine prunes this model"):
        Engine(model, DartConfig(method="static", sparsity=0.5))
    first.close()
    Engine(model, DartConfig(method="static", sparsity=0.5)).close()


def test_budgets_average_to_sparsity_and_respect_bounds():
    config = DartConfig()
    generator = torch.Generator().manual_seed(0)
    for sparsity in (0.1, 0.3, 0.5, 0.7, 0.9, 0.95):
        for layers in (2, 12, 30):
            importance = torch.rand(layers, generator=generator)
            ratios = pruning_ratios(importance, sparsity, config)
            assert abs(float(ratios.mean()) - sparsity) < 1e-6
            lo, hi = min(config.p_min, sparsity), max(config.p_max, sparsity)
            assert float(ratios.min()) >= lo - 1e-9 and float(ratios.max()) <= hi + 1e-9
            keep = keep_counts(ratios, [1536] * layers)
            realised = sum(1 - k / 1536 for k in keep) / layers
            assert abs(realised - sparsity) <= 1 / 1536


def test_budget_formula_and_first_layer_gets_its_own_budget():
    """Without clipping, p_l = rho L P_l / sum P with P = (1 - minmax(S)) D; layer 0 is not given layer L-1's."""
    config = DartConfig(p_min=0.0, p_max=1.0)
    importance = torch.tensor([0.2, 0.5, 0.1, 0.4, 0.3, 0.9], dtype=torch.float64)
    ratios = pruning_ratios(importance, 0.3, config)
    normalised = (importance - importance.min()) / (importance.max() - importance.min())
    weight = (1 - normalised) * depth_protection(6, config)
    expected = 0.3 * 6 * weight / weight.sum()
    torch.testing.assert_close(ratios, expected)
    assert ratios[0] != ratios[-1]
    # depth protection: first layer at a, last at b
    d = depth_protection(11, config)
    assert d[0] == pytest.approx(config.early_floor) and d[-1] == pytest.approx(config.late_floor)
    assert d[5] == 1.0


@pytest.mark.parametrize("variant", ["residual", "ffn-vs-input"])
def test_layer_importance_is_the_documented_formula(variant):
    """S = mean over valid tokens of (1 - cos(h, other)) |f| / |h|, other = h + f (or f), padding left out."""
    generator = torch.Generator().manual_seed(0)
    h, f = torch.randn(2, 7, 32, generator=generator), 0.3 * torch.randn(2, 7, 32, generator=generator)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False
    other = h + f if variant == "residual" else f
    per_token = ((1 - torch.nn.functional.cosine_similarity(h, other, dim=-1)) * f.norm(dim=-1) / h.norm(dim=-1))
    expected = torch.stack([per_token[0].mean(), per_token[1, 3:].mean()])
    torch.testing.assert_close(layer_importance(h, f, valid, variant), expected)
    assert torch.all(layer_importance(h, torch.zeros_like(f), valid, variant) == 0)


@pytest.mark.parametrize("batch", [1, 2])
def test_budgets_come_from_each_rows_prompt_importance(batch):
    """The engine reduces every layer's importance at the end of the prompt's forward: the same budgets as
    layer_importance over the residual entering each FFN block and the block's output, per row."""
    model = tiny_model("llama")
    ids = random_ids(batch, 12, seed=5)
    h, f = {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, args, out, i=i: h.__setitem__(i, args[0].detach().clone())))
        hooks.append(layer.mlp.register_forward_hook(lambda m, args, out, i=i: f.__setitem__(i, out.detach().clone())))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    valid = torch.ones(batch, 12, dtype=torch.bool)
    importance = torch.stack([layer_importance(h[i], f[i], valid) for i in range(LAYERS)], dim=1)  # [batch, layers]
    config = DartConfig(sparsity=0.6)
    with dartprune.attach(model, config) as handle:
        with torch.no_grad():
            model(ids)
        stats = handle.stats()
    for b in range(batch):
        assert stats[b].keep_counts == keep_counts(pruning_ratios(importance[b], 0.6, config), [INTERMEDIATE] * LAYERS)
    assert len(set(stats[0].keep_counts)) > 1


def test_uniform_allocation_and_zero_sparsity():
    ratios = pruning_ratios(torch.rand(8), 0.4, DartConfig(allocation="uniform"))
    assert torch.all(ratios == 0.4)
    assert torch.all(pruning_ratios(torch.rand(8), 0.0, DartConfig()) == 0)
    flat = pruning_ratios(torch.ones(5), 0.5, DartConfig())
    assert not torch.isnan(flat).any() and abs(float(flat.mean()) - 0.5) < 1e-6


def test_top_neurons_breaks_ties_by_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert top_neurons(scores, 2).tolist() == [1, 2]
    assert top_neurons(scores, 4).tolist() == [1, 2, 3, 4]


def test_top_neurons_equals_a_stable_sort_with_many_ties():
    generator = torch.Generator().manual_seed(0)
    for size, k in [(50, 0), (50, 1), (50, 17), (50, 49), (50, 50), (1536, 768)]:
        scores = torch.randint(0, 5, (size,), generator=generator).float()
        expected = torch.sort(scores, descending=True, stable=True).indices[:k].sort().values
        assert torch.equal(top_neurons(scores, k), expected)


def test_top_neurons_of_many_rows_at_once_equal_a_stable_sort_of_each_row():
    """One sort of every layer's scores selects, per row and with its own k, what a stable sort of that row would
    (ties to the lower index)."""
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (5, 64), generator=generator).float()
    ks = [0, 1, 20, 63, 64]
    got = top_neurons_rows(scores, ks)
    expected = [torch.sort(s, descending=True, stable=True).indices[:k].sort().values for s, k in zip(scores, ks)]
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]


def test_top_neurons_keeps_exactly_k_and_ranks_nan_scores_last():
    """A NaN score (activations that overflowed) is never kept while a finite one is left, and the budget holds."""
    scores = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 2.0, float("nan")])
    assert top_neurons(scores, 3).tolist() == [2, 3, 4]
    assert top_neurons(scores, 4).tolist() == [0, 2, 3, 4]
    assert top_neurons(scores, 5).tolist() == [0, 1, 2, 3, 4]


def test_same_length_groups_stack_rows_of_each_length_in_key_order():
    rows = {0: torch.zeros(3), 1: torch.ones(5), 2: torch.full((3,), 2.0), 5: torch.full((5,), 3.0)}
    groups = same_length_groups(rows)
    assert [keys for keys, _ in groups] == [[0, 2], [1, 5]]
    for keys, stacked in groups:
        assert torch.equal(stacked, torch.stack([rows[k] for k in keys]))


def test_masks_are_deterministic_and_layer_budgets_follow_the_prompt():
    model = tiny_model("qwen2")
    ids = random_ids(1, 30, seed=3)
    kept = []
    for _ in range(2):
        with dartprune.attach(model, DartConfig(sparsity=0.5)) as handle:
            model(ids)
            kept.append([handle.engine.kept(0, layer) for layer in range(LAYERS)])
            keep = handle.stats()[0].keep_counts
    assert all(torch.equal(a, b) for a, b in zip(*kept))
    assert len(set(keep)) > 1
    assert abs(sum(1 - k / INTERMEDIATE for k in keep) / LAYERS - 0.5) <= 1 / INTERMEDIATE


def test_scores_accumulate_in_float32_without_overflow():
    """fp16 activations whose squares overflow fp16 still give finite float32 scores."""
    from dartprune.engine.scoring import squared_activations
    u = torch.full((1, 4, 3), 300.0, dtype=torch.float16)
    sumsq = squared_activations(u, torch.ones(1, 4, dtype=torch.bool), "l2")
    assert sumsq.dtype == torch.float32 and torch.isfinite(sumsq).all()
    assert sumsq[0, 0].item() == pytest.approx(4 * 300.0 ** 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_ffn_permutes_in_place_swaps_only_changed_neurons_and_restores_exactly(family):
    """The kept neurons become a prefix of the layer's own weights (no copy); the FFN over that prefix equals the
    dense FFN with the others masked; a new kept set swaps only the neurons that enter; restore is exact."""
    from dartprune.architectures import FFNParts, get_adapter
    model = tiny_model(family)
    parts = get_adapter(model).ffn_parts(get_adapter(model).layers()[1])
    names = [n for n in ("gate", "up", "up_bias", "down") if getattr(parts, n) is not None]
    before = {n: getattr(parts, n).detach().clone() for n in names}
    unpermuted = FFNParts(gate=before.get("gate"), up=before["up"], up_bias=before.get("up_bias"),
                          down=before["down"], down_bias=parts.down_bias, act=parts.act)
    pointers = [getattr(parts, n).data_ptr() for n in names]
    x = torch.randn(2, 3, parts.up.shape[1])
    prefix = PrefixFFN(parts)
    mask = torch.zeros(INTERMEDIATE)
    old = torch.tensor([0, 3, 4, 9, 20, 21, 50, 95])
    assert prefix.keep(old) == 5                     # 0, 3 and 4 are already among the first 8 positions
    assert prefix.kept().tolist() == old.tolist()
    mask[old] = 1
    torch.testing.assert_close(prefix.forward(x), masked_ffn(unpermuted, x, mask), rtol=1e-5, atol=1e-5)
    new = torch.tensor([0, 3, 4, 9, 20, 21, 60, 61])
    assert prefix.keep(new) == 2                     # 60 and 61 enter, swapped with 50 and 95
    mask.zero_()
    mask[new] = 1
    torch.testing.assert_close(prefix.forward(x), masked_ffn(unpermuted, x, mask), rtol=1e-5, atol=1e-5)
    for tokens in (1, 5, 16):                       # a re-trace's activations of every neuron, by position
        ring = torch.randn(tokens, parts.up.shape[1])
        torch.testing.assert_close(prefix.to_ids(prefix.activations(ring)), activations(unpermuted, ring),
                                   rtol=1e-5, atol=1e-5)
    assert [getattr(parts, n).data_ptr() for n in names] == pointers   # the model's own storage, no copy
    assert not all(torch.equal(getattr(parts, n), before[n]) for n in names)
    prefix.restore()
    assert all(torch.equal(getattr(parts, n), before[n]) for n in names)
    assert prefix.k == INTERMEDIATE



@pytest.mark.parametrize("down_layout", ["neuron-major", "row-major"])
def test_a_neuron_order_that_is_not_a_permutation_is_refused_and_moves_nothing(down_layout):
    """The compiled restore follows the order's cycles (rows) or scatters each row by it (columns of a row-major
    down projection); an order with a repeated id would never close a cycle or lose a neuron, one out of range would
    write outside the weights. Both are refused before any row or column moves."""
    from dartprune.architectures import FFNParts
    from dartprune.engine import weights
    if weights.swap_library() is None:
        pytest.skip("the compiled swap cannot be built here (no C compiler, or DARTPRUNE_KERNEL=0)")
    generator = torch.Generator().manual_seed(0)
    gate, up, down_t = (torch.randn(32, 8, generator=generator) for _ in range(3))
    down = down_t.t() if down_layout == "neuron-major" else down_t.t().contiguous()
    original = [t.clone() for t in (gate, up, down_t)]
    down_t = down.t()                   # the same values, in the layout under test
    prefix = PrefixFFN(FFNParts(gate=gate, up=up, up_bias=None, down=down, down_bias=None, act=torch.nn.SiLU()))
    assert prefix.uses_compiled_swap()
    prefix.keep(torch.tensor([3, 9, 17, 30]))
    for bad in (1, 32):                 # id 1 twice (a swap partner is lost), then an id past the end
        prefix.order = prefix.order.clone()
        held, prefix.order[0] = int(prefix.order[0]), bad
        before = [t.clone() for t in (gate, up, down_t)]
        with pytest.raises(RuntimeError, match="not a permutation"):
            prefix.restore()
        assert all(torch.equal(t, b) for t, b in zip((gate, up, down_t), before))
        prefix.order[0] = held
    prefix.restore()
    assert torch.equal(prefix.order, torch.arange(32, dtype=torch.int32))
    assert all(torch.equal(t, o) for t, o in zip((gate, up, down_t), original))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("down_layout", ["neuron-major", "row-major"])
@pytest.mark.parametrize("hidden", [40, 1100])
def test_compiled_neuron_moves_equal_pytorch_and_restore_exactly(dtype, down_layout, hidden):
    """The in-place compiled swaps leave the weights bit-equal to PyTorch's index_copy_, whatever the dtype (2, 4
    and 8 bytes), for neurons as rows and as columns of a row-major down projection (kept so in reduced precision on
    a CPU), and restore (compiled too: rows moved along the permutation's cycles, in pieces of 2 KB, so 1100 float32
    columns take three; columns scattered row by row) gives back the original weights."""
    from dartprune.architectures import FFNParts
    from dartprune.engine import weights
    if weights.swap_library() is None:
        pytest.skip("the compiled swap cannot be built here (no C compiler, or DARTPRUNE_KERNEL=0)")

    def run(compiled: bool):
        weights.set_compiled_swap(compiled)
        generator = torch.Generator().manual_seed(0)
        size = 96
        gate, up = (torch.randn(size, hidden, generator=generator).to(dtype) for _ in range(2))
        up_bias = torch.randn(size, generator=generator).to(dtype)
        down = torch.randn(size, hidden, generator=generator).to(dtype)
        down = down.t() if down_layout == "neuron-major" else down.t().contiguous()
        tensors = [gate, up, up_bias, down]
        original = [t.clone() for t in tensors]
        prefix = PrefixFFN(FFNParts(gate=gate, up=up, up_bias=up_bias, down=down, down_bias=None,
                                    act=torch.nn.SiLU()))
        used = prefix.uses_compiled_swap()
        for seed in range(4):
            prefix.keep(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:30 + 5 * seed].sort()
                        .values)
        permuted = [t.clone() for t in tensors] + [prefix.order.clone()]
        prefix.restore()
        assert all(torch.equal(t, o) for t, o in zip(tensors, original))
        return permuted, used

    try:
        expected, used_off = run(compiled=False)
        got, used_on = run(compiled=True)
    finally:
        weights.set_compiled_swap(True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(got[-1], torch.arange(96, dtype=torch.int32))     # neurons did move
    assert not used_off and used_on


def test_a_compiler_that_cannot_run_is_a_reason_to_fall_back_not_an_error(monkeypatch, tmp_path):
    from dartprune import compiled
    from dartprune.engine.weights import SWAP_SOURCE
    monkeypatch.setenv("DARTPRUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    reason = compiled.build(SWAP_SOURCE, "swap")
    assert isinstance(reason, str) and "no-such-compiler" in reason
    silent = tmp_path / "silent-cc"                # a compiler that fails without a word on stderr
    silent.write_text("#!/bin/sh\nexit 3\n")
    silent.chmod(0o755)
    monkeypatch.setenv("CC", str(silent))
    assert compiled.build(SWAP_SOURCE, "swap") == f"{silent} failed: exit status 3"
    monkeypatch.setenv("DARTPRUNE_KERNEL", "0")
    assert compiled.build(SWAP_SOURCE, "swap") == "switched off by DARTPRUNE_KERNEL=0"


def test_own_pages_keeps_every_value_and_layout():
    from dartprune.engine.weights import own_pages
    for tensor in (torch.randn(300, 70), torch.randn(70, 300).t(), torch.randn(5000, dtype=torch.bfloat16),
                   torch.randn(40, 90)[:, 10:50]):
        before, stride, pointer = tensor.clone(), tensor.stride(), tensor.data_ptr()
        own_pages(tensor)
        assert torch.equal(tensor, before) and tensor.stride() == stride and tensor.data_ptr() == pointer



@pytest.mark.parametrize("layout", ["row-major", "neuron-major", "column prefix"])
@pytest.mark.parametrize("block_bytes", [1 << 20, 4 * 4 * 37, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_over_narrower_weights_equals_the_widened_product_in_any_block_size(layout, block_bytes, with_bias):
    """Widening in blocks (of rows, or of input columns where the weight is stored transposed) gives x W^T + b of
    the widened weight; same-dtype weights go straight to F.linear."""
    from dartprune.engine.weights import linear
    torch.manual_seed(0)
    stored = {"row-major": torch.randn(96, 40), "neuron-major": torch.randn(40, 96).t(),
              "column prefix": torch.randn(96, 64)}[layout].bfloat16()[:, :40]
    assert stored.is_contiguous() == (layout == "row-major") and stored.t().is_contiguous() == (layout == "neuron-major")
    bias = torch.randn(96).bfloat16() if with_bias else None
    x = torch.randn(2, 5, 40)
    want = torch.nn.functional.linear(x, stored.float(), None if bias is None else bias.float())
    got = linear(x, stored, bias, block_bytes=block_bytes)
    assert got.dtype == torch.float32 and got.shape == (2, 5, 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    same = stored.float()
    assert torch.equal(linear(x, same, None, block_bytes=1), torch.nn.functional.linear(x, same))


@pytest.mark.parametrize("path, faulted", [("compact", True), ("mask", False)])
def test_an_engine_that_swaps_in_place_faults_in_every_ffn_weight_once(monkeypatch, path, faulted):
    import dartprune.engine.engine as engine_module
    from dartprune.architectures import get_adapter
    touched = []
    monkeypatch.setattr(engine_module, "own_pages", lambda tensor: touched.append(tensor.data_ptr()))
    model = tiny_model("llama")
    engine = Engine(model, DartConfig(sparsity=0.5, path=path))
    try:
        adapter = get_adapter(model)
        weights = [t.data_ptr() for layer in adapter.layers() for p in [adapter.ffn_parts(layer)]
                   for t in (p.gate, p.up, p.down)]
        assert sorted(touched) == (sorted(weights) if faulted else [])
    finally:
        engine.close()

def test_pruning_a_model_loaded_from_safetensors_leaves_the_file_and_the_values_as_they_were(tmp_path):
    """Loaded weights can live in a copy-on-write mapping of the file: the engine writes them in place (its neuron
    swaps), which must change neither the file nor, after close, a single value."""
    from transformers import AutoModelForCausalLM
    tiny_model("llama").save_pretrained(tmp_path)
    files = {f: f.read_bytes() for f in tmp_path.glob("*.safetensors")}
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = random_ids(1, 16)
    dense = model.generate(ids, max_new_tokens=8, do_sample=False)
    with dartprune.attach(model, DartConfig(sparsity=0.6)):
        pruned = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert not torch.equal(dense, pruned)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), dense)
    assert {f: f.read_bytes() for f in files} == files

def test_batch_rows_equal_single_runs():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    prompts = [random_ids(1, 14, seed=5)[0], random_ids(1, 9, seed=6)[0]]
    singles = []
    config = DartConfig(sparsity=0.5, **HAIR_TRIGGER)
    for prompt in prompts:
        with dartprune.attach(model, config) as handle:
            out = model.generate(prompt[None], max_new_tokens=25, do_sample=False, pad_token_id=0)
            singles.append((out[0, prompt.numel():], handle.stats()[0]))
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, width - prompt.numel():] = prompt
        mask[b, width - prompt.numel():] = 1
    with dartprune.attach(model, config) as handle:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False, pad_token_id=0)
        stats = handle.stats()
    for b, (tokens, single) in enumerate(singles):
        assert torch.equal(out[b, width:], tokens)
        assert stats[b].keep_counts == single.keep_counts
        assert stats[b].prompt_tokens == prompts[b].numel()
        assert stats[b].retrace_positions == single.retrace_positions


def test_one_token_prompt_and_sampling_work_without_nan():
    model = tiny_model("gpt2")
    with dartprune.attach(model, DartConfig(sparsity=0.5)) as handle:
        torch.manual_seed(0)
        out = model.generate(random_ids(1, 1), max_new_tokens=100, do_sample=True, top_p=0.9, temperature=0.8)
        stats = handle.stats()[0]
    assert out.shape == (1, 101)
    assert stats.prompt_tokens == 1 and stats.tokens == 100
    assert all(math.isfinite(w.cosine) and math.isfinite(w.threshold) for w in stats.windows)
    assert stats.windows, "the baseline must be completed from decode tokens and monitoring must start"


def test_state_does_not_grow_with_generation_length():
    model = tiny_model("llama")
    ids = random_ids(1, 20)
    with dartprune.attach(model, DartConfig(sparsity=0.5)) as handle:
        model.generate(ids, max_new_tokens=100, do_sample=False, min_new_tokens=100)
        short = handle.stats()[0].state_bytes
        model.generate(ids, max_new_tokens=2000, do_sample=False, min_new_tokens=2000)
        stats = handle.stats()[0]
    assert stats.tokens == 20 + 1999  # tokens fed through the model: the prompt, then every generated token but the last
    assert stats.state_bytes == short


@pytest.mark.parametrize("config", [DartConfig(method="static"), DartConfig(method="griffin"),
                                    DartConfig(sparsity=0.0)], ids=["static", "griffin", "rho0"])
def test_no_ring_buffer_where_nothing_retraces(config):
    """Only a re-tracing method fills the ring buffer: the others hold just their scores and kept indices."""
    model = tiny_model("llama")
    with dartprune.attach(model, config) as handle:
        model.generate(random_ids(1, 20), max_new_tokens=10, do_sample=False)
        stats = handle.stats()[0]
    # float32 scores and the int32 neuron order of each layer; nothing at all when nothing is pruned
    expected = 0 if config.sparsity == 0 else sum(stats.intermediate_sizes) * 8
    assert stats.state_bytes == expected


def test_streamer_and_stopping_criteria_work():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.chunks.append(None)

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 15, dtype=torch.bool)

    model = tiny_model("mistral")
    streamer = Collect()
    with dartprune.attach(model, DartConfig(sparsity=0.5)):
        out = model.generate(random_ids(1, 8), max_new_tokens=30, do_sample=False, streamer=streamer,
                             stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert out.shape[1] == 15
    assert streamer.chunks[-1] is None and len(streamer.chunks) == 1 + 7 + 1


def test_executed_sparsity_counts_the_dense_prefill():
    model = tiny_model("llama")
    with dartprune.attach(model, DartConfig(sparsity=0.5, method="static")) as handle:
        model.generate(random_ids(1, 10), max_new_tokens=30, min_new_tokens=30, do_sample=False)
        stats = handle.stats()[0]
    # 10 prompt tokens dense, then 29 pruned forwards of one token (the last generated token is never fed)
    expected = 29 * 0.5 / 39
    assert stats.executed_sparsity == pytest.approx(expected, abs=1 / INTERMEDIATE)
    assert stats.retrace_count == 0 and stats.overhead_fraction > 0


@pytest.mark.parametrize("family,share", [("llama", 2 / 3), ("gpt2", 1 / 2)])
def test_work_sparsity_counts_each_retrace_scoring_exactly(family, share):
    """A re-trace from the ring computes the gate and up products of every neuron over the ring's tokens: two of
    a gated neuron's three products, one of two without a gate."""
    model = tiny_model(family)
    with dartprune.attach(model, DartConfig(sparsity=0.5, ring_size=6, **HAIR_TRIGGER)) as handle:
        model.generate(random_ids(1, 20, seed=2), max_new_tokens=40, min_new_tokens=40, do_sample=False)
        stats = handle.stats()[0]
    assert stats.retrace_count >= 1
    expected = stats.executed_sparsity - stats.retrace_count * 6 * share / stats.tokens
    assert stats.work_sparsity == pytest.approx(expected, abs=1e-12)
    assert f"{stats.work_sparsity:.1%} counting re-trace scoring" in stats.summary()


def test_dense_steps_retrace_mode_runs_dense_then_rebuilds():
    model = tiny_model("llama")
    config = DartConfig(sparsity=0.5, retrace="dense-steps", dense_steps=4, **HAIR_TRIGGER)
    with dartprune.attach(model, config) as handle:
        model.generate(random_ids(1, 20, seed=2), max_new_tokens=60, min_new_tokens=60, do_sample=False)
        stats = handle.stats()[0]
    assert stats.retrace_count >= 1
    static_like = 59 * 0.5 / 79
    assert stats.executed_sparsity < static_like - 1e-3
    assert stats.work_sparsity == stats.executed_sparsity      # its dense tokens are in the executed sparsity already


def test_dense_steps_count_tokens_when_forwards_carry_several():
    """Teacher-forced chunks of 5 tokens: a re-trace ends exactly `dense_steps` tokens after its trigger."""
    model = tiny_model("llama")
    config = DartConfig(sparsity=0.5, retrace="dense-steps", dense_steps=10, **HAIR_TRIGGER)
    with dartprune.attach(model, config) as handle:
        teacher_forced_logits(model, random_ids(1, 140, seed=3), prefix=20, chunk=5)
        stats = handle.stats()[0]
    triggers = [w.position for w in stats.windows if w.pressure >= config.trigger_count]
    assert stats.retrace_count >= 1
    for retrace in stats.retraces:
        assert retrace.position - config.dense_steps in triggers


def test_a_forced_retrace_while_a_row_traces_dense_is_refused_and_changes_nothing():
    """In a dense-steps re-trace the row traces dense and rebuilds its masks at the end: a forced re-trace then has
    nothing to do (it had failed inside the phase table after moving the weights)."""
    model = tiny_model("llama")
    engine = Engine(model, DartConfig(sparsity=0.5, retrace="dense-steps", dense_steps=8, **HAIR_TRIGGER))
    try:
        native = NativeModel(model, engine)
        native.forward(random_ids(1, 20, seed=2)[0])
        for i in range(60):
            if engine.phase(0) is Phase.TRACING:
                break
            native.forward(random_ids(1, 1, seed=100 + i)[0])
        assert engine.phase(0) is Phase.TRACING
        with pytest.raises(RuntimeError, match="row 0 is tracing dense"):
            engine.retrace(0)
        assert engine.phase(0) is Phase.TRACING
        for i in range(8):
            native.forward(random_ids(1, 1, seed=200 + i)[0])
        assert engine.phase(0) is Phase.PRUNED and engine.stats()[0].retrace_count == 1
    finally:
        engine.close()


@pytest.mark.parametrize("chunk, forwards", [(1, 4), (3, 2)])
def test_spread_retrace_scores_layers_in_proportion_to_the_tokens_fed(chunk, forwards):
    """retrace_spread = 8 tokens over 4 layers: half a layer per token, so one layer per 1-token forward and two
    per 3-token forward; the row prunes throughout and the re-trace is recorded once, where it began."""
    model = tiny_model("llama")
    engine = Engine(model, DartConfig(sparsity=0.5, detector="none", retrace_spread=8))
    try:
        native = NativeModel(model, engine)
        native.forward(random_ids(1, 16, seed=4)[0])
        native.forward(random_ids(1, 3, seed=5)[0])
        engine.retrace(0, now=False)
        assert engine.phase(0) is Phase.RETRACING
        for i in range(forwards):
            assert engine.phase(0) is Phase.RETRACING and engine.stats()[0].retrace_count == 0
            native.forward(random_ids(1, chunk, seed=6 + i)[0])
        assert engine.phase(0) is Phase.PRUNED
        [record] = engine.stats()[0].retraces
        assert record.position == 19
        assert engine.stats()[0].executed_sparsity > 0
    finally:
        engine.close()


@pytest.mark.parametrize("chunk", [1, 5])
def test_spread_retraces_give_the_same_logits_on_the_compact_and_mask_paths(chunk):
    """While a spread re-trace is under way some layers run their new neurons and others their old: both
    execution paths must agree at every step."""
    model = tiny_model("llama")
    ids = random_ids(1, 70, seed=7)
    results = {}
    for path in ("compact", "mask"):
        config = DartConfig(sparsity=0.6, path=path, retrace_spread=10, **HAIR_TRIGGER)
        with dartprune.attach(model, config) as handle:
            results[path] = teacher_forced_logits(model, ids, prefix=12, chunk=chunk)
            results[path + "_retraces"] = handle.stats()[0].retrace_positions
    assert len(results["compact_retraces"]) >= 2
    assert results["compact_retraces"] == results["mask_retraces"]
    assert (results["compact"] - results["mask"]).abs().max() <= 1e-4



def test_build_spread_moves_the_first_masks_in_after_the_prompt_one_share_per_token():
    """build_spread = 8 tokens over 4 layers: the prompt's forward moves nothing (its first token does not wait),
    each later token moves half a layer's worth, the unmoved layers run dense (so the first decoded token is
    dense's, to rounding), and the executed neurons are counted layer by layer."""
    model = tiny_model("llama")
    prompt, steps = random_ids(1, 16, seed=4)[0], random_ids(1, 6, seed=5)[0]
    dense = NativeModel(model)
    dense.forward(prompt)
    first_dense = dense.forward(steps[:1])
    reference = Engine(model, DartConfig(sparsity=0.5, detector="none"))
    try:
        pruned = NativeModel(model, reference)
        pruned.forward(prompt)
        keep = reference.keep_counts()
        first_pruned = pruned.forward(steps[:1])
    finally:
        reference.close()
    engine = Engine(model, DartConfig(sparsity=0.5, detector="none", build_spread=8))
    try:
        native = NativeModel(model, engine)
        native.forward(prompt)
        assert engine.keep_counts() == [INTERMEDIATE] * LAYERS
        torch.testing.assert_close(native.forward(steps[:1]), first_dense, rtol=1e-5, atol=1e-5)
        assert (first_pruned - first_dense).abs().max() > 1e-2
        moved = [engine.keep_counts()]
        for i in range(1, 5):
            native.forward(steps[i:i + 1])
            moved.append(engine.keep_counts())
            if i == 1:                       # layers 0 and 1 moved: they keep their sets, 2 and 3 run every neuron
                assert [torch.equal(engine.kept(0, j), torch.arange(INTERMEDIATE)) for j in range(LAYERS)] == [
                    False, False, True, True]
        assert moved == [keep[:1] + [INTERMEDIATE] * 3, keep[:2] + [INTERMEDIATE] * 2,
                         keep[:3] + [INTERMEDIATE], keep, keep]
        executed = 16 * LAYERS * INTERMEDIATE + sum(sum(k) for k in [[INTERMEDIATE] * LAYERS] + moved[:4])
        assert engine.stats()[0].executed_sparsity == pytest.approx(1 - executed / (21 * LAYERS * INTERMEDIATE))
    finally:
        engine.close()


@pytest.mark.parametrize("chunk", [1, 5])
def test_build_spread_gives_the_same_logits_on_the_compact_and_mask_paths(chunk):
    model = tiny_model("llama")
    ids = random_ids(1, 40, seed=8)
    results = {}
    for path in ("compact", "mask"):
        with dartprune.attach(model, DartConfig(sparsity=0.6, path=path, build_spread=6, **HAIR_TRIGGER)) as handle:
            results[path] = teacher_forced_logits(model, ids, prefix=12, chunk=chunk)
            results[path + "_sparsity"] = handle.stats()[0].executed_sparsity
    torch.testing.assert_close(results["compact"], results["mask"], rtol=1e-4, atol=1e-4)
    assert results["compact_sparsity"] == results["mask_sparsity"]

def test_drift_monitor_waits_for_two_windows_and_triggers_on_pressure():
    monitor = PaperDetector(window=5, delta=0.1, floor=0.1, trigger_count=2, cooldown=1)
    base = torch.randn(1, 1, 16)
    monitor.fit(base.expand(1, 3, 16) + 0.01 * torch.randn(1, 3, 16))
    assert not monitor.fitted
    assert not monitor.observe(base.expand(1, 7, 16) + 0.01 * torch.randn(1, 7, 16), end_position=10)
    assert monitor.fitted and math.isfinite(monitor.threshold)
    assert monitor.threshold == pytest.approx(monitor.mu - 0.1)
    away = -base.expand(1, 5, 16)
    assert not monitor.observe(away, end_position=15)
    assert monitor.pressure == 1
    assert monitor.observe(away, end_position=20)
    assert [r.position for r in monitor.records] == [15, 20]
    monitor.refit(base.expand(1, 10, 16) + 0.01 * torch.randn(1, 10, 16))
    assert monitor.pressure == 0 and monitor.cooldown_left == 1
    assert not monitor.observe(away, end_position=25)
    assert monitor.pressure == 0


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(method="magic"),
                                 dict(allocation="greedy"), dict(window=0), dict(p_min=0.8, p_max=0.2),
                                 dict(method="threshold")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        DartConfig(**bad)


@pytest.mark.parametrize("setting, message", [
    ("delta=abc", "delta must be a number, got 'abc'"), ("retrace_blend=None", "retrace_blend must be a number"),
    ("sparsity=nan", "sparsity must be a number"), ("window=True", "window must be an integer"),
    ("seed=1.5", "seed must be an integer"), ("prune_prefill=1", "prune_prefill must be true or false"),
    ("cooldown=2.0", "cooldown must be an integer"), ("seed=-1", "seed must be in"),
    ("seed=9223372036854775808", r"seed must be in \[0, 2\^63\)"),
    ("ring_size=100000000000", "ring_size must be <= 4096"),
])
def test_settings_of_the_wrong_type_are_config_errors(setting, message):
    """What `--set` and a server request give: a clear ConfigError, never a TypeError or a value taken as truthy."""
    with pytest.raises(ConfigError, match=message):
        DartConfig.from_dict(parse_settings([setting]))


def test_a_method_that_prunes_nothing_has_no_sparsity_but_keeps_the_one_asked_for():
    assert DartConfig(method="dense", sparsity=0.5).pruned_sparsity == 0.0
    assert DartConfig(method="static", sparsity=0.5).pruned_sparsity == 0.5
    assert DartConfig(method="dense", sparsity=0.5).replace(method="dart").pruned_sparsity == 0.5
    with pytest.raises(ConfigError, match="sparsity"):
        DartConfig(method="dense", sparsity=1.5)


def test_config_takes_numpy_numbers_as_python_ones():
    import numpy as np
    config = DartConfig(sparsity=np.float32(0.5), window=np.int64(4), prune_prefill=np.bool_(True),
                        monitored_layers=(np.int64(-1), np.float32(0.5)))
    assert config.monitored_layers == (-1, 0.5) and type(config.monitored_layers[0]) is int
    assert config.prune_prefill is True and DartConfig(monitored_layers=np.int64(2)).monitored_layers == (2,)


def test_settings_read_command_line_booleans_and_none():
    assert parse_settings(["prune_prefill=false", "a=True", "b=None", "detector=none", "d=0.5", "e=(0, -1)",
                           "f=x"]) == {"prune_prefill": False, "a": True, "b": None, "detector": "none", "d": 0.5,
                                       "e": (0, -1), "f": "x"}
    assert DartConfig.from_dict(parse_settings(["prune_prefill=false"])).prune_prefill is False
    assert DartConfig.from_dict(parse_settings(["prune_prefill=true"])).prune_prefill is True


def test_config_from_dict_names_unknown_keys():
    with pytest.raises(ConfigError, match="sparsty"):
        DartConfig.from_dict({"sparsty": 0.5})
    assert DartConfig.from_dict({"sparsity": 0.3}).sparsity == 0.3


def test_monitored_layers_by_index_or_relative_depth():
    with pytest.raises(ConfigError, match="out of range"):
        dartprune.attach(tiny_model("llama"), DartConfig(monitored_layers=(LAYERS,)))
    for bad in ((1.5,), (True,), ("last",)):
        with pytest.raises(ConfigError, match="relative depths"):
            DartConfig(monitored_layers=bad)
    engine = Engine(tiny_model("llama"), DartConfig(monitored_layers=(0.3, 1.0, -1, 0)))
    assert engine.monitored == [0, 1, LAYERS - 1]          # round(0.3 * 3) = 1; 1.0 and -1 are the last layer
    engine.close()


def test_attach_works_on_a_model_dispatched_over_cpu_and_disk(tmp_path):
    """accelerate's device map with disk offload: offloaded layers run through their own modules with masked
    activations (their weights are loaded only while they run); the rest permute in place. Same logits as the
    model held whole in memory, and detach leaves it as it was."""
    from transformers import AutoModelForCausalLM
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                      offload_folder=tmp_path / "offload").eval()
    assert dispatched.model.layers[1].mlp.gate_proj.weight.device.type == "meta"
    ids = random_ids(1, 40, seed=4)
    config = DartConfig(sparsity=0.6, **HAIR_TRIGGER)
    results = {}
    for name, m in (("memory", model), ("dispatched", dispatched)):
        with dartprune.attach(m, config) as handle:
            results[name] = teacher_forced_logits(m, ids, prefix=12, chunk=3)
            results[name + "_stats"] = handle.stats()[0]
    assert (results["memory"] - results["dispatched"]).abs().max() <= 1e-4
    assert results["memory_stats"].retrace_positions == results["dispatched_stats"].retrace_positions
    assert results["dispatched_stats"].retrace_count >= 2
    pair = random_ids(2, 30, seed=5)                             # two rows run on masks, offloaded layers too
    for name, m in (("memory", model), ("dispatched", dispatched)):
        with dartprune.attach(m, config):
            results[name + "_pair"] = teacher_forced_logits(m, pair, prefix=12, chunk=2)
    assert (results["memory_pair"] - results["dispatched_pair"]).abs().max() <= 1e-4
    dense = teacher_forced_logits(dispatched, ids, prefix=12)
    with torch.no_grad():
        assert (dense - model(ids).logits).abs().max() <= 1e-5
    with dartprune.attach(dispatched, config):                   # saved attached, it reloads as the model it is
        dispatched.generate(ids[:, :8], max_new_tokens=3, do_sample=False)
        dispatched.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits - model(ids).logits
                ).abs().max() <= 1e-5
