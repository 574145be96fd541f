"""Tiny random models of every supported family, built offline from configs, for fast exact tests."""
from __future__ import annotations

import string

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers import (
    GemmaConfig, Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig,
    Phi3Config, Qwen2Config, Qwen3Config,
)

from tests.conftest import MINI

HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB = 32, 96, 4, 4, 160

_COMMON = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=4096,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**_COMMON),
    "mistral": MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": Qwen2Config(**_COMMON),
    "qwen3": Qwen3Config(**_COMMON, head_dim=8),
    "gemma": GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": Gemma2Config(**_COMMON, head_dim=8),
    "gemma3_text": Gemma3TextConfig(**_COMMON, head_dim=8),
    "phi3": Phi3Config(**_COMMON),
    "gpt2": GPT2Config(n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
                       n_positions=4096, bos_token_id=1, eos_token_id=2),
    "opt": OPTConfig(hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     vocab_size=VOCAB, max_position_embeddings=4096, word_embed_proj_dim=HIDDEN,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=4096,
                              bos_token_id=1, eos_token_id=2),
}
FAMILIES = sorted(CONFIGS)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised model of `family`, in eval mode, with weights large enough to give varied outputs."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family], dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def tiny_tokenizer():
    """A 160-token BPE (the tiny models' vocabulary) over printable ASCII, trained on the tests' own texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    alphabet = list(string.ascii_letters + string.digits + string.punctuation) + ["\u2581", "\n"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator([p.read_text(encoding="utf-8") for p in sorted((MINI / "gutenberg").glob("*.txt"))],
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
