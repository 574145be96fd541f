"""Conversations: the KV cache kept across turns, each new user turn traced like a prompt.

A `Conversation` renders the messages with the tokenizer's chat template and feeds the model only what its cache
does not hold yet: the tokens after the longest prefix shared with the cached ones (usually the end of the last
reply and the new user turn; if the template re-tokenises the reply differently, the cache is cut back to where
they agree). Those tokens run dense and traced, like a prompt, and the engine rebuilds the masks from them
(`DartConfig.turn_blend` keeps part of the earlier scores) and refits the drift baseline; then the reply is
generated pruned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from dartprune.decode.generate import Generation, Generator, SamplingParams, check_text


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                tokenize: bool = True) -> list[int] | str:
    """The token ids (or, `tokenize=False`, the text) of `messages` in the tokenizer's chat template (the one place
    the template is applied)."""
    if not has_chat_template(tokenizer):
        raise ValueError("this model's tokenizer has no chat template")
    if not tokenize:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True)["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


@dataclass
class Turn:
    """One exchange: what the user said and how the reply went."""

    user: str
    reply: Generation
    new_tokens: int               # tokens fed for the turn (its template and text), before the reply
    rewound: int = 0              # cached tokens cut back because the template tokenised them differently


@dataclass
class Conversation:
    """A chat with one model; `generator` must run the native loop (it holds the cache between turns)."""

    generator: Generator
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)      # what the cache holds, in order

    def __post_init__(self) -> None:
        if self.generator.loop != "native":
            raise ValueError("a conversation keeps its cache between turns, which needs the native loop "
                             f"(this model runs on {self.generator.loop!r})")
        if not has_chat_template(self.generator.tokenizer):
            raise ValueError("this model's tokenizer has no chat template")
        self.reset()

    def reset(self) -> None:
        """Start over: no messages, an empty cache."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turns = []
        self.tokens = []
        self.generator.native.reset()

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        return render_chat(self.generator.tokenizer, messages)

    def say(self, text: str, params: SamplingParams = SamplingParams(),
            on_text: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> Generation:
        """Add a user turn and generate the reply (streamed to `on_text`; `should_stop` is asked after every
        token, so a Ctrl-C handler can end a reply cleanly)."""
        if not check_text(text, "the message").strip():
            raise ValueError("the message is empty")
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.render(messages)
        self.generator.check_length(len(ids), params.max_new_tokens)    # before the cache is touched
        shared = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(ids) - 1)                # at least one token is fed for the turn
        native = self.generator.native
        rewound = native.cache.length - shared
        native.cache.length = shared
        new = ids[shared:]
        reply = self.generator.continue_(torch.tensor(new), params, on_text, new_turn=shared > 0,
                                         should_stop=should_stop)
        self.tokens = ids + reply.tokens[:native.cache.length - len(ids)]
        self.messages = messages + [{"role": "assistant", "content": reply.text}]
        self.turns.append(Turn(text, reply, len(new), rewound))
        return reply
