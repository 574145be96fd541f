"""`dartprune chat`: a terminal chat with a model, dense or pruned; each user turn is traced and the masks follow
the conversation. Commands: /reset, /stats, /quit (or Ctrl-D); Ctrl-C stops a reply without ending the chat."""
from __future__ import annotations

import argparse
from collections.abc import Callable
import signal
import sys
from typing import TextIO

from dartprune.cli.generate import DEFAULT_SPARSITY, config_from
from dartprune.decode.chat import Conversation
from dartprune.decode.generate import Generator, SamplingParams
from dartprune.decode.model import native_runs, native_supported
from dartprune.methods import METHODS
from dartprune.models import DEFAULT_MODEL, check_context, load_model

NATIVE_METHODS = sorted(name for name in METHODS if native_runs(name))
HELP = "commands: /reset (start over), /stats (this chat's figures), /quit; Ctrl-C stops a reply"


def register(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    p = add_parser("chat", help="chat in the terminal, dense or pruned (each turn re-traced)",
                              description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or Hugging Face id")
    p.add_argument("--method", default="dart", choices=NATIVE_METHODS,
                   help="chat runs on the native loop, which runs these methods")
    p.add_argument("--sparsity", type=float, help="fraction of FFN neurons removed, in [0, 1) (default "
                                                 f"{DEFAULT_SPARSITY}; not for --method dense)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-file", help="for wanda-static (see `dartprune calibrate`)")
    p.add_argument("--system", help="a system message")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other DartConfig field")
    p.set_defaults(run=run)


class Interrupt:
    """While a reply streams, Ctrl-C sets a flag the loop reads after each token (instead of an exception in the
    middle of a forward)."""

    def __init__(self) -> None:
        self.pressed = False

    def __enter__(self) -> Interrupt:
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._press)
        return self

    def _press(self, signum, frame) -> None:
        self.pressed = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def stats_line(conversation: Conversation) -> str:
    turns = conversation.turns
    if not turns:
        return "no turns yet"
    last = turns[-1].reply
    tokens = sum(len(t.reply.tokens) for t in turns)
    seconds = sum(t.reply.ttft_s + t.reply.decode_s for t in turns)
    return (f"{len(turns)} turn{'s' if len(turns) != 1 else ''}, {tokens} reply tokens at "
            f"{tokens / seconds if seconds else 0:.1f} tokens/s; cache {conversation.generator.native.cache.length} "
            f"tokens | {last.stats.summary()}")


def chat_loop(conversation: Conversation, params: SamplingParams, read: TextIO, write: TextIO,
              interactive: bool) -> None:
    """Read user turns until /quit or end of input; write the replies as they stream."""
    write.write(f"[{HELP}]\n")
    while True:
        if interactive:
            write.write("> ")
            write.flush()
        try:
            line = read.readline()
        except KeyboardInterrupt:             # Ctrl-C at the prompt ends the chat, as end of input does
            write.write("\n")
            break
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            conversation.reset()
            write.write("[conversation reset]\n")
            continue
        if text == "/stats":
            write.write(f"[{stats_line(conversation)}]\n")
            continue
        if text.startswith("/"):
            write.write(f"[unknown command {text.split()[0]}; {HELP}]\n")
            continue
        try:
            with Interrupt() as interrupt:
                reply = conversation.say(text, params, on_text=lambda t: (write.write(t), write.flush()),
                                         should_stop=lambda: interrupt.pressed)
        except ValueError as err:
            write.write(f"[error: {err}]\n")
            continue
        write.write("\n" + ("[stopped]\n" if reply.finish_reason == "interrupted" else ""))
        write.flush()


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    config = config_from(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    check_context(model, args.max_new_tokens + 1, f"--max-new-tokens {args.max_new_tokens} after a one-token turn")
    if not native_supported(model):
        raise ValueError(f"chat runs on dartprune's native loop, which runs Llama- and Gemma-family models held in "
                         f"memory; {args.model} ({model.config.model_type}) is not one. "
                         f"`dartprune generate --loop hf` runs it")
    with Generator(model, tokenizer, config, loop="native") as generator:
        conversation = Conversation(generator, system=args.system)
        chat_loop(conversation, params, sys.stdin, sys.stdout, sys.stdin.isatty())
    return 0
