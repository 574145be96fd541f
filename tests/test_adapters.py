import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from dartprune.architectures import UnsupportedModelError, get_adapter, supported_model_types
from tests.tiny_models import FAMILIES, HIDDEN, INTERMEDIATE, LAYERS, random_ids, tiny_model


def ffn_from_parts(parts, x):
    pre = x @ parts.up.T + (parts.up_bias if parts.up_bias is not None else 0)
    u = parts.act(x @ parts.gate.T) * pre if parts.gated else parts.act(pre)
    return u @ parts.down.T + (parts.down_bias if parts.down_bias is not None else 0), u


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_reproduce_the_ffn_module(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layers = adapter.layers()
    assert len(layers) == LAYERS
    x = torch.randn(2, 5, HIDDEN)
    for layer in layers:
        parts = adapter.ffn_parts(layer)
        assert parts.intermediate_size == INTERMEDIATE
        captured = []
        handle = adapter.down_proj(layer).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        expected = adapter.ffn(layer)(x)
        handle.remove()
        got, u = ffn_from_parts(parts, x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u, captured[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_taps_see_the_attention_output_and_residual(family):
    """The attention tap gives one vector per token; the FFN-input tap sees the residual stream entering the FFN."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    seen = {}
    hooks = []
    for i, layer in enumerate(adapter.layers()):
        hooks.append(adapter.attention(layer).register_forward_hook(
            lambda m, a, out, i=i: seen.setdefault(("attn", i), out[0])))
        norm = adapter.ffn_input_norm(layer)
        if norm is not None:
            hooks.append(norm.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(("h", i), a[0])))
    ids = random_ids(2, 7)
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for i in range(LAYERS):
        assert seen[("attn", i)].shape == (2, 7, HIDDEN)
        if ("h", i) in seen:
            assert seen[("h", i)].reshape(2, 7, HIDDEN).shape == (2, 7, HIDDEN)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_ffn_swaps_and_restores(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = random_ids(1, 6)
    with torch.no_grad():
        before = model(ids).logits
    layer = adapter.layers()[1]
    original = adapter.ffn(layer)

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    adapter.set_ffn(layer, Zero())
    with torch.no_grad():
        changed = model(ids).logits
    adapter.set_ffn(layer, original)
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, changed)
    assert torch.equal(before, after)


def test_unsupported_model_names_class_and_families():
    model = BloomForCausalLM(BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(model)
    assert "BloomForCausalLM" in str(err.value)
    for family in ("llama", "gpt2", "opt", "gpt_neox", "phi3", "gemma3_text"):
        assert family in str(err.value)
    assert set(FAMILIES) <= set(supported_model_types())


def test_a_model_without_a_language_model_head_is_refused_clearly():
    """The base model or a classifier of a supported family is not a causal LM (it had failed with an
    AttributeError, after laying out the weights anew)."""
    import copy
    from transformers import AutoModel, AutoModelForSequenceClassification
    from tests.tiny_models import CONFIGS
    for builder in (AutoModel, AutoModelForSequenceClassification):
        model = builder.from_config(copy.deepcopy(CONFIGS["llama"]))
        with pytest.raises(UnsupportedModelError, match="has no language-model head.*AutoModelForCausalLM"):
            get_adapter(model)


def test_llama_ffn_biases_are_refused_rather_than_dropped():
    import copy
    from transformers import AutoModelForCausalLM
    from tests.tiny_models import CONFIGS
    config = copy.deepcopy(CONFIGS["llama"])
    config.mlp_bias = True
    model = AutoModelForCausalLM.from_config(config)
    adapter = get_adapter(model)
    with pytest.raises(ValueError, match="has FFN biases \\(mlp_bias=True\\)"):
        adapter.ffn_parts(adapter.layers()[0])


def test_opt_with_an_embedding_projection_scores_its_prior_in_the_embedding_space():
    """OPT-350m's layout: the last hidden state is projected to a smaller embedding size before the logits; the
    vocabulary prior goes through that projection (it had failed with a shape error)."""
    import copy
    import dartprune
    from transformers import AutoModelForCausalLM
    from dartprune import DartConfig
    from dartprune.engine.scoring import neuron_prior
    from tests.tiny_models import CONFIGS
    config = copy.deepcopy(CONFIGS["opt"])
    config.word_embed_proj_dim = HIDDEN // 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    adapter = get_adapter(model)
    down = adapter.ffn_parts(adapter.layers()[0]).down
    projected = adapter.to_embedding_space(down)
    assert projected.shape == (HIDDEN // 2, INTERMEDIATE)
    embeddings = adapter.output_embeddings()
    brute = (embeddings @ model.model.decoder.project_out.weight @ down).abs().max(dim=0).values
    torch.testing.assert_close(neuron_prior(projected, embeddings, "vocab-max"), brute)
    with dartprune.attach(model, DartConfig(sparsity=0.5, prior="vocab-max")) as handle:
        model.generate(random_ids(1, 10), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert handle.stats()[0].executed_sparsity > 0
