"""The native decode loop: equal to Hugging Face's forward and generate, dense and pruned, with and without the
compiled step; sampling, streaming, stop strings and EOS."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import dartprune
from dartprune import DartConfig
from dartprune.decode import kernel as kernel_module
from dartprune.decode.generate import Generator, SamplingParams, TextStream, sample
from dartprune.decode.model import NativeModel, native_supported
from dartprune.engine import Engine
from tests.helpers import HAIR_TRIGGER, teacher_forced_logits
from tests.tiny_models import CONFIGS, FAMILIES, VOCAB, random_ids, tiny_model, tiny_tokenizer

NATIVE = ["gemma", "gemma2", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"]


def native_logits(native: NativeModel, ids: torch.Tensor, prefix: int, chunk: int = 1) -> torch.Tensor:
    """The prefix as one forward, then `chunk` tokens at a time: every position's logits."""
    out = [native.forward(ids[:prefix])]
    for start in range(prefix, ids.numel(), chunk):
        out.append(native.forward(ids[start:start + chunk]))
    return torch.cat(out)


def windowed(family: str, window: int = 4) -> torch.nn.Module:
    config = copy.deepcopy(CONFIGS[family])
    config.sliding_window = window
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    return model


def test_native_loop_covers_the_llama_and_gemma_families_only():
    assert sorted(f for f in FAMILIES if native_supported(tiny_model(f))) == NATIVE


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("family", NATIVE)
def test_native_forward_equals_hugging_face(family, kernel):
    model = tiny_model(family)
    ids = random_ids(1, 30, seed=1)[0]
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
    native = NativeModel(model, kernel=kernel)
    assert (native.kernel is not None) == (kernel and kernel_module.library() is not None)
    assert (native_logits(native, ids, 12, chunk=1) - reference).abs().max() <= 1e-4
    native.reset()
    assert (native_logits(native, ids, 5, chunk=4) - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_last_only_logits_are_the_last_row_of_the_full_ones(family, kernel):
    """Generation asks for the last token's logits only; the cache and the engine see the same forward, so what
    follows is unchanged (pruned, with re-traces)."""
    model = tiny_model(family)
    ids = random_ids(1, 24, seed=7)[0]
    runs = []
    for last_only in (False, True):
        engine = Engine(model, DartConfig(sparsity=0.5, **HAIR_TRIGGER))
        native = NativeModel(model, engine, kernel=kernel)
        try:
            first = native.forward(ids[:12], last_only=last_only)
            later = [native.forward(ids[t:t + 1], last_only=last_only) for t in range(12, 21)]
            later.append(native.forward(ids[21:24], last_only=last_only))     # a few tokens at once
            runs.append((first, later, [r.position for r in engine.stats()[0].retraces]))
        finally:
            engine.close()
    (full, full_later, full_retraces), (last, last_later, last_retraces) = runs
    assert full.shape == (12, model.config.vocab_size) and last.shape == (1, model.config.vocab_size)
    torch.testing.assert_close(last, full[-1:], rtol=0, atol=1e-6)
    assert full_later[-1].shape[0] == 3 and all(b.shape[0] == 1 for b in last_later)
    for a, b in zip(full_later, last_later):
        torch.testing.assert_close(b, a[-1:], rtol=0, atol=1e-6)
    assert last_retraces == full_retraces and full_retraces


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text"])
def test_sliding_window_attention_equals_hugging_face(family, kernel, chunk):
    """A window of 4 cuts attention off in the prompt and in every later forward, one token or a few at a time."""
    model = windowed(family)
    ids = random_ids(1, 24, seed=2)[0]
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
    native = NativeModel(model, kernel=kernel)
    assert any(layer.window == 4 for layer in native.decoder.layers)
    assert (native_logits(native, ids, 10, chunk=chunk) - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("chunk", [1, 5])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_pruned_native_loop_equals_attach_with_hugging_face(family, kernel, chunk):
    """The engine driven by the native loop and by Hugging Face hooks computes the same logits and re-traces at
    the same positions (one engine, two drivers), token by token and in teacher-forced chunks."""
    model = tiny_model(family)
    ids = random_ids(1, 60, seed=3)[0]
    config = DartConfig(sparsity=0.6, **HAIR_TRIGGER)
    with dartprune.attach(model, config) as handle:
        reference = teacher_forced_logits(model, ids[None], prefix=16, chunk=chunk)[0]
        expected = handle.stats()[0]
    engine = Engine(model, config)
    native = NativeModel(model, engine, kernel=kernel)
    ours = native_logits(native, ids, 16, chunk=chunk)
    stats = engine.stats()[0]
    engine.close()
    assert (ours - reference).abs().max() <= 1e-4
    assert stats.retrace_positions == expected.retrace_positions and stats.retrace_count >= 3
    assert stats.keep_counts == expected.keep_counts
    assert stats.executed_sparsity == pytest.approx(expected.executed_sparsity)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prune_prefill_runs_the_prompt_pruned_in_the_native_loop_as_with_hugging_face(family):
    """prune_prefill: the prompt is traced dense, then run again on the masks, in both drivers alike."""
    model = tiny_model(family)
    ids = random_ids(1, 30, seed=6)[0]
    results = {}
    for prune_prefill in (False, True):
        config = DartConfig(sparsity=0.6, prune_prefill=prune_prefill, **HAIR_TRIGGER)
        with dartprune.attach(model, config) as handle:
            reference = teacher_forced_logits(model, ids[None], prefix=16, chunk=1)[0]
            expected = handle.stats()[0]
        engine = Engine(model, config)
        try:
            ours = native_logits(NativeModel(model, engine), ids, 16, chunk=1)
            stats = engine.stats()[0]
        finally:
            engine.close()
        assert (ours - reference).abs().max() <= 1e-4
        assert stats.retrace_positions == expected.retrace_positions
        assert stats.executed_sparsity == pytest.approx(expected.executed_sparsity)
        results[prune_prefill] = (ours, stats)
    (dense_prompt, dense_stats), (pruned_prompt, pruned_stats) = results[False], results[True]
    assert (dense_prompt[:16] - pruned_prompt[:16]).abs().max() > 1e-2       # the prompt itself ran pruned
    # the same budgets; the dense tracing pass counts as dense work, so the pruned replay of the prompt is extra
    assert pruned_stats.keep_counts == dense_stats.keep_counts
    extra = 16 * sum(pruned_stats.keep_counts) / (pruned_stats.tokens * sum(pruned_stats.intermediate_sizes))
    assert pruned_stats.executed_sparsity == pytest.approx(dense_stats.executed_sparsity - extra)


def test_native_generation_equals_hugging_face_generate_on_smollm2(smollm2):
    """Greedy, dense: the same 64 tokens as `model.generate`."""
    model, tokenizer = smollm2
    ids = tokenizer("The history of the printing press", return_tensors="pt").input_ids[0]
    with torch.no_grad():
        expected = model.generate(ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                                  max_new_tokens=64, min_new_tokens=64, do_sample=False, temperature=None,
                                  top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)[0, ids.numel():]
    with Generator(model, tokenizer, loop="native") as generator:
        result = generator.generate(ids, SamplingParams(max_new_tokens=64, ignore_eos=True))
    assert result.tokens == expected.tolist() and result.finish_reason == "length"


def test_generator_picks_its_loop_and_other_families_use_hugging_face():
    tokenizer = tiny_tokenizer()
    ids = torch.tensor(tokenizer("the harbour").input_ids)
    for family, loop in (("llama", "native"), ("gpt2", "hf")):
        model = tiny_model(family)
        with Generator(model, tokenizer, DartConfig(sparsity=0.5)) as generator:
            result = generator.generate(ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
        assert generator.loop == loop and len(result.tokens) == 12
        assert result.stats.tokens == ids.numel() + 11 and result.stats.keep_counts != [96] * 4
    with pytest.raises(ValueError, match="--loop hf"):
        Generator(tiny_model("gpt2"), tokenizer, loop="native")


def test_native_and_hf_loops_generate_the_same_pruned_tokens():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    ids = torch.tensor(tokenizer("the light on the water").input_ids)
    outputs = []
    for loop in ("native", "hf"):
        with Generator(model, tokenizer, DartConfig(sparsity=0.5), loop=loop) as generator:
            outputs.append(generator.generate(ids, SamplingParams(max_new_tokens=30, ignore_eos=True)))
    assert outputs[0].tokens == outputs[1].tokens
    assert outputs[0].stats.retrace_positions == outputs[1].stats.retrace_positions


def test_sampling_is_seeded_and_filters_follow_their_definitions():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])
    assert sample(logits, SamplingParams(), None) == 4
    draws = [sample(logits, SamplingParams(temperature=1.0, seed=0), torch.Generator().manual_seed(0))
             for _ in range(3)]
    assert len(set(draws)) == 1                                          # the same generator seed, the same draw
    top1 = SamplingParams(temperature=5.0, top_k=1)
    assert {sample(logits, top1, torch.Generator().manual_seed(s)) for s in range(20)} == {4}
    nucleus = SamplingParams(temperature=1.0, top_p=0.5)                 # p(4) = 0.63 alone reaches 0.5
    assert {sample(logits, nucleus, torch.Generator().manual_seed(s)) for s in range(20)} == {4}
    wide = SamplingParams(temperature=1.0, top_p=0.9)
    assert len({sample(logits, wide, torch.Generator().manual_seed(s)) for s in range(60)}) >= 2
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0), dict(stop=("",)),
                dict(seed=-1), dict(seed=2 ** 64), dict(temperature=float("nan")), dict(temperature=float("inf")),
                dict(top_p=float("nan"))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.mark.parametrize("loop", ["native", "hf"])
def test_seeded_sampling_repeats_and_differs_by_seed_and_leaves_the_global_generator_alone(loop):
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen2")
    ids = torch.tensor(tokenizer("the harbour").input_ids)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with Generator(model, tokenizer, DartConfig(sparsity=0.5), loop=loop) as generator:
        runs = [generator.generate(ids, SamplingParams(max_new_tokens=20, temperature=1.0, seed=s, ignore_eos=True))
                for s in (1, 1, 2)]
    assert runs[0].tokens == runs[1].tokens != runs[2].tokens
    assert torch.equal(torch.get_rng_state(), state)          # the caller's own draws are not reseeded


class Tokens:
    """A tokenizer stand-in whose tokens are characters (decode joins them)."""

    eos_token_id = None

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(t) for t in tokens)


def test_text_stream_holds_back_possible_stop_strings_and_cuts_at_them():
    sent = []
    stream = TextStream(Tokens(), ["###", "END"], sent.append)
    for char in "Hello #":
        assert not stream.add(ord(char))
    assert "".join(sent) == "Hello"                              # " #" could start "###": held back
    assert not stream.add(ord("#"))
    assert stream.add(ord("#"))                                  # "###" appeared
    assert stream.text == "Hello " and "".join(sent) == "Hello "
    stream = TextStream(Tokens(), [], sent.clear() or sent.append)
    for char in "ab\ufffd":
        stream.add(ord(char))
    assert "".join(sent) == "ab"                                 # an incomplete character waits
    stream.finish()
    assert "".join(sent) == "ab\ufffd"


def test_generation_stops_at_eos_and_at_stop_strings():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    ids = torch.tensor(tokenizer("the harbour").input_ids)
    with Generator(model, tokenizer) as generator:
        free = generator.generate(ids, SamplingParams(max_new_tokens=40, ignore_eos=True))
        text = free.text
        stop = text[len(text) // 2:len(text) // 2 + 2]
        stopped = generator.generate(ids, SamplingParams(max_new_tokens=40, stop=(stop,), ignore_eos=True))
        first_new = next(j for j in range(1, 40) if free.tokens[j] not in free.tokens[:j])
        generator.eos = {free.tokens[first_new]}
        ended = generator.generate(ids, SamplingParams(max_new_tokens=40))
    assert stopped.finish_reason == "stop" and stopped.text == text[:text.find(stop)]
    assert ended.finish_reason == "eos" and ended.tokens == free.tokens[:first_new]
    assert free.finish_reason == "length" and len(free.tokens) == 40


@pytest.mark.parametrize("loop", ["native", "hf"])
def test_generation_refuses_token_ids_outside_the_vocabulary(loop):
    with Generator(tiny_model("llama"), tiny_tokenizer(), loop=loop) as generator:
        for bad in (VOCAB, -1):
            with pytest.raises(ValueError, match=f"token id {bad} is outside the model's vocabulary of {VOCAB} ids"):
                generator.generate([3, bad, 4], SamplingParams(max_new_tokens=2))
        assert len(generator.generate([3, 4], SamplingParams(max_new_tokens=2, ignore_eos=True)).tokens) == 2


def test_generation_refuses_a_batch_and_a_model_already_attached():
    import dartprune
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with Generator(model, tokenizer, DartConfig(sparsity=0.5)) as generator:
        with pytest.raises(ValueError, match=r"one prompt \(\[tokens\] or \[1, tokens\]\), got shape \(2, 5\)"):
            generator.generate(random_ids(2, 5), SamplingParams(max_new_tokens=2))
        assert len(generator.generate(random_ids(1, 5), SamplingParams(max_new_tokens=2, ignore_eos=True)).tokens) == 2
    with dartprune.attach(model, DartConfig(sparsity=0.5)):
        for loop in ("native", "hf"):
            with pytest.raises(RuntimeError, match="already attached to this model; detach that handle first"):
                Generator(model, tokenizer, DartConfig(sparsity=0.5), loop=loop)


def test_generation_refuses_what_does_not_fit_the_context():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    with Generator(model, tokenizer) as generator, pytest.raises(ValueError, match="the model.s context is 4096 tokens"):
        generator.generate(torch.ones(4090, dtype=torch.long), SamplingParams(max_new_tokens=10))


def test_generation_reserves_the_cache_before_the_first_token():
    """The cache holds the whole reply before decoding starts: no decode step pays for growing it."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    ids = torch.tensor(tokenizer("the harbour").input_ids)
    seen: list[int] = []
    with Generator(model, tokenizer) as generator:
        assert generator.native.cache.capacity < ids.numel() + 300          # it would grow on the way
        reply = generator.generate(ids, SamplingParams(max_new_tokens=300, ignore_eos=True),
                                   on_text=lambda _: seen.append(generator.native.cache.capacity))
    assert len(reply.tokens) == 300 and seen
    assert set(seen) == {seen[0]} and seen[0] >= ids.numel() + 300


@pytest.mark.parametrize("loop", ["native", "hf"])
def test_a_generated_sequence_ends_with_the_weights_in_their_own_order(loop):
    """After `generate` the model holds its own weights again (the next prompt has nothing to move back), its
    statistics and kept sets stay readable, the next sequence is the same, and a sequence continued after its end
    runs pruned exactly as one that never ended."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    before = [(p, p.detach().clone()) for p in model.parameters()]
    ids = torch.tensor(tokenizer("the light on the water").input_ids)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    with Generator(model, tokenizer, DartConfig(sparsity=0.5, **HAIR_TRIGGER), loop=loop) as generator:
        first = generator.generate(ids, params)
        assert first.stats.retraces and first.stats.keep_counts != [96] * 4
        assert all(torch.equal(p, copy) for p, copy in before)
        assert generator.engine.stats()[0].tokens == first.stats.tokens
        engine = generator.engine
        kept = [engine.kept(0, layer) for layer in range(len(engine.layers))]
        second = generator.generate(ids, params)
        assert second.tokens == first.tokens
        assert second.stats.retrace_positions == first.stats.retrace_positions
        assert all(torch.equal(engine.kept(0, layer), k) for layer, k in enumerate(kept))
        if loop == "native":          # continued after its end, and the same sequence never ended
            more = generator.native.forward(torch.tensor(first.tokens[-1:] + [5, 6, 7]))
            kept_more = [engine.kept(0, layer) for layer in range(len(engine.layers))]
            generator.native.reset()
            generator.continue_(ids, params, new_turn=False)
            again = generator.native.forward(torch.tensor(first.tokens[-1:] + [5, 6, 7]))
            assert (more - again).abs().max() <= 1e-4
            assert all(torch.equal(engine.kept(0, layer), k) for layer, k in enumerate(kept_more))


def test_without_the_kernel_the_pytorch_step_runs(monkeypatch):
    monkeypatch.setattr("dartprune.decode.model.library", lambda dtype: None)
    model = tiny_model("llama")
    native = NativeModel(model)
    assert native.kernel is None
    ids = random_ids(1, 10)[0]
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
    assert (native_logits(native, ids, 4) - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("family", NATIVE)
def test_bfloat16_model_computes_what_its_float32_copy_does(family, kernel):
    """On a CPU the native loop widens bfloat16 weights to float32 as it reads them (the prompt through PyTorch, the
    steps through the compiled step's bfloat16 build): its logits are the float32 copy's under Hugging Face."""
    model = tiny_model(family).to(torch.bfloat16)
    ids = random_ids(1, 30, seed=1)[0]
    with torch.no_grad():
        reference = copy.deepcopy(model).float()(ids[None]).logits[0]
    native = NativeModel(model, kernel=kernel)
    assert (native.kernel is not None) == (kernel and kernel_module.library(torch.bfloat16) is not None)
    assert (native_logits(native, ids, 12, chunk=1) - reference).abs().max() <= 1e-4
    native.reset()
    assert (native_logits(native, ids, 5, chunk=4) - reference).abs().max() <= 1e-4


def test_the_compiled_step_refuses_a_model_whose_tensors_are_not_all_of_its_dtype():
    """The bfloat16 build reads every tensor it is handed as bfloat16: a float32 bias (or norm) beside bfloat16
    weights would be read as garbage, so such a model runs the PyTorch step, whose logits stay right. A dtype with no
    build says so instead of failing."""
    model = tiny_model("qwen2").to(torch.bfloat16)
    attention = model.model.layers[1].self_attn
    attention.k_proj.bias.data = attention.k_proj.bias.data.float()
    native = NativeModel(model)
    assert native.kernel is None and "not all torch.bfloat16" in kernel_module.kernel_applies(native)
    reference = NativeModel(model, kernel=False)
    ids = random_ids(1, 12, seed=2)[0]
    assert torch.equal(native_logits(native, ids, 4), native_logits(reference, ids, 4))
    assert kernel_module.library(torch.float16) is None
    assert "no build for torch.float16" in kernel_module.unavailable_reason(torch.float16)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text"])
def test_compiled_bfloat16_step_equals_the_float32_step_on_the_same_weights(family):
    """Widening a bfloat16 weight is exact, and both builds of the step run the same float32 sums in the same
    order: from the same cache, their logits are equal bit for bit."""
    model = tiny_model(family).to(torch.bfloat16)
    wide = copy.deepcopy(model).float()
    narrow, full = NativeModel(model), NativeModel(wide)
    if narrow.kernel is None or full.kernel is None:
        pytest.skip(f"no compiled step here: {kernel_module.unavailable_reason(torch.bfloat16)}")
    ids = random_ids(1, 20, seed=4)[0]
    narrow.forward(ids[:8])
    for native in (narrow, full):
        native.reserve(32)
    full.cache.k.copy_(narrow.cache.k)
    full.cache.v.copy_(narrow.cache.v)
    full.cache.length = narrow.cache.length
    for t in range(8, 20):
        assert torch.equal(narrow.forward(ids[t:t + 1]), full.forward(ids[t:t + 1]))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_pruned_bfloat16_native_loop_agrees_on_every_path(family):
    """A bfloat16 model pruned in the native loop (its engine `widened`: the down projection laid out neuron-major):
    the compiled step, the PyTorch step and the mask path compute the same logits and re-trace at the same
    positions; `close` gives back the weights bit for bit."""
    model = tiny_model(family).to(torch.bfloat16)
    before = {name: p.clone() for name, p in model.named_parameters()}
    ids = random_ids(1, 60, seed=3)[0]
    runs = {}
    for path in ("compact", "mask"):
        for kernel in (True, False):
            engine = Engine(model, DartConfig(sparsity=0.6, path=path, **HAIR_TRIGGER), widened=True)
            assert not engine.parts[0].down.is_contiguous() and engine.parts[0].down.t().is_contiguous()
            native = NativeModel(model, engine, kernel=kernel)
            runs[path, kernel] = native_logits(native, ids, 16), engine.stats()[0].retrace_positions
            engine.close()
    reference, positions = runs["compact", True]
    assert len(positions) >= 3
    for logits, where in runs.values():
        assert (logits - reference).abs().max() <= 1e-4 and where == positions
    assert all(torch.equal(p, before[name]) and p.is_contiguous() for name, p in model.named_parameters())


def test_generator_lays_bfloat16_weights_out_for_the_loop_that_reads_them():
    """The native loop reads bfloat16 weights widened (the neuron-major down projection pays there, as in float32);
    Hugging Face's forward multiplies in bfloat16, where the row-major layout is the fast one."""
    model = tiny_model("llama").to(torch.bfloat16)
    for loop, neuron_major in (("native", True), ("hf", False)):
        with Generator(model, tiny_tokenizer(), DartConfig(sparsity=0.5), loop=loop) as generator:
            assert generator.engine.parts[0].down.is_contiguous() is not neuron_major
            assert generator.generate(random_ids(1, 12)[0], SamplingParams(max_new_tokens=3)).tokens
        assert model.model.layers[0].mlp.down_proj.weight.is_contiguous()


def test_kernel_refuses_a_position_outside_the_cache():
    native = NativeModel(tiny_model("llama"), capacity=32)
    if native.kernel is None:
        pytest.skip(f"no compiled step here: {kernel_module.unavailable_reason()}")
    with pytest.raises(ValueError, match="outside the cache"):
        native.kernel.run([3], 32, [96] * 4, [], False, 1)
    with pytest.raises(ValueError, match="takes 1 to"):
        native.kernel.run([3] * (native.kernel.max_tokens + 1), 1, [96] * 4, [], False, 1)


def test_engine_lays_down_projections_out_neuron_major_and_restores_them():
    model = tiny_model("llama")
    down = model.model.layers[0].mlp.down_proj.weight
    before = down.detach().clone()
    assert down.is_contiguous()
    engine = Engine(model, DartConfig(sparsity=0.5))
    assert down.t().is_contiguous() and torch.equal(down, before)
    engine.close()
    assert down.is_contiguous() and torch.equal(down, before)


@pytest.mark.parametrize("method", ["dense", "dart"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_static_shape_step_for_cuda_graphs_equals_the_native_forward(family, method):
    """The step CUDA graphs replay, run eagerly on the CPU: the same logits and re-traces as the native forward."""
    from dartprune.decode.graph import GraphStep
    model = windowed(family, window=8) if family == "gemma3_text" else tiny_model(family)
    ids = random_ids(1, 50, seed=7)[0]
    config = DartConfig(method=method, sparsity=0.0 if method == "dense" else 0.6, min_trace_tokens=14,
                        **HAIR_TRIGGER)
    outputs, stats = [], []
    for use_graph_step in (False, True):
        engine = Engine(model, config)
        native = NativeModel(model, engine, capacity=64, kernel=False)
        step = GraphStep(native, capture=False)
        logits = [native.forward(ids[:10])]
        for t in range(10, 50):
            logits.append(step.forward(int(ids[t])) if use_graph_step else native.forward(ids[t:t + 1]))
        outputs.append(torch.cat(logits))
        stats.append(engine.stats()[0])
        engine.close()
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-4
    assert stats[0].retrace_positions == stats[1].retrace_positions
    assert stats[0].executed_sparsity == pytest.approx(stats[1].executed_sparsity)
    if method == "dart":
        assert stats[1].retrace_count >= 2 and stats[1].prompt_tokens == 10


def test_static_shape_step_refuses_an_engine_that_does_not_run_the_prefix():
    from dartprune.decode.graph import GraphStep
    model = tiny_model("llama")
    for config in (DartConfig(sparsity=0.5, path="mask"), DartConfig(sparsity=0.5, path="compact")):
        engine = Engine(model, config)
        try:
            native = NativeModel(model, engine, kernel=False)
            if config.path == "mask":
                with pytest.raises(ValueError, match="compact path"):
                    GraphStep(native, capture=False)
            else:
                GraphStep(native, capture=False)
        finally:
            engine.close()


@pytest.mark.parametrize("loop", ["native", "hf"])
def test_a_closed_generator_refuses_to_generate_and_keeps_its_statistics(loop):
    """After close (or its `with` block) the model is restored: generating would run it dense in the hf loop and
    fail deep in the engine in the native one, so it is refused; closing twice does nothing. Token ids come as a
    tensor or a list; text is refused (encode it first)."""
    model = tiny_model("llama")
    ids = random_ids(1, 12, seed=2)[0]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    with Generator(model, tiny_tokenizer(), DartConfig(sparsity=0.5), loop=loop) as generator:
        first = generator.generate(ids, params)
        assert generator.generate(ids.tolist(), params).tokens == first.tokens
        with pytest.raises(TypeError, match="encode the text"):
            generator.generate("some text", params)
    with pytest.raises(RuntimeError, match="Generator is closed"):
        generator.generate(ids, params)
    generator.close()
    assert generator.engine.stats()[0].tokens == first.stats.tokens       # the last sequence stays readable


def test_attach_takes_a_dict_and_its_stats_outlive_detach():
    model = tiny_model("llama")
    ids = random_ids(1, 12, seed=2)
    with dartprune.attach(model, {"sparsity": 0.5, "window": 4}) as handle:
        assert handle.config.window == 4
        model.generate(ids, max_new_tokens=6, do_sample=False)
        during = handle.stats()[0]
    after = handle.stats()[0]
    assert (after.tokens, after.keep_counts, after.executed_sparsity) == (
        during.tokens, during.keep_counts, during.executed_sparsity) and after.tokens == 17
    with pytest.raises(RuntimeError, match="engine is closed"):
        handle.engine.start(1)
    with pytest.raises(TypeError, match="DartConfig or a dict"):
        dartprune.attach(model, 0.5)


def test_should_stop_interrupts_both_loops_at_the_same_token():
    """The server's disconnect check: asked after every token; both loops stop there with the same tokens, and
    neither runs a forward after the last token (the engine counts the same tokens, the same steps are timed)."""
    model = tiny_model("llama")
    ids = random_ids(1, 12, seed=2)[0]
    replies = {}
    for loop in ("native", "hf"):
        asked = []

        def should_stop() -> bool:
            asked.append(1)
            return len(asked) >= 4

        streamed = []
        with Generator(model, tiny_tokenizer(), DartConfig(sparsity=0.5), loop=loop) as generator:
            replies[loop] = generator.generate(ids, SamplingParams(max_new_tokens=40, ignore_eos=True),
                                               on_text=streamed.append, should_stop=should_stop)
        assert replies[loop].finish_reason == "interrupted" and "".join(streamed) == replies[loop].text
    native, hf = replies["native"], replies["hf"]
    assert native.tokens == hf.tokens and len(hf.tokens) == 4
    assert native.stats.tokens == hf.stats.tokens == 12 + 3 and len(native.step_s) == len(hf.step_s) == 3


@pytest.mark.parametrize("case", ["stop string", "length", "end of sequence", "ignore_eos"])
def test_both_loops_end_a_reply_at_the_same_token_with_the_same_work(case):
    model = tiny_model("llama")
    tokenizer = tiny_tokenizer()
    ids = random_ids(1, 12, seed=2)[0]
    with Generator(model, tokenizer, DartConfig(sparsity=0.5), loop="native") as generator:
        free = generator.generate(ids, SamplingParams(max_new_tokens=30, ignore_eos=True))
    params = SamplingParams(max_new_tokens=8)
    if case == "stop string":
        params = SamplingParams(max_new_tokens=30, stop=(tokenizer.decode(free.tokens[:6])[-2:],))
    model.generation_config.eos_token_id = free.tokens[5] if case in ("end of sequence", "ignore_eos") else None
    if case == "ignore_eos":
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    replies = {}
    for loop in ("native", "hf"):
        with Generator(model, tokenizer, DartConfig(sparsity=0.5), loop=loop) as generator:
            replies[loop] = generator.generate(ids, params)
    native, hf = replies["native"], replies["hf"]
    assert (native.tokens, native.finish_reason, native.text) == (hf.tokens, hf.finish_reason, hf.text)
    assert native.stats.tokens == hf.stats.tokens and len(native.step_s) == len(hf.step_s)
    assert native.finish_reason == {"stop string": "stop", "length": "length", "end of sequence": "eos",
                                    "ignore_eos": "length"}[case]
    if case == "ignore_eos":
        assert free.tokens[5] in native.tokens                   # the end-of-sequence token was sampled and kept
