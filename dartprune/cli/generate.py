"""`dartprune generate`: stream a continuation from a model, dense or pruned, and summarise the run."""
from __future__ import annotations

import argparse
from collections.abc import Callable
import sys

import torch
from dartprune.decode.chat import has_chat_template, render_chat
from dartprune.decode.generate import Generation, Generator, SamplingParams, check_text
from dartprune.engine import DartConfig
from dartprune.methods import METHODS
from dartprune.engine.config import ConfigError, check_no_method_or_sparsity, parse_settings
from dartprune.models import DEFAULT_MODEL, load_model

DEFAULT_SPARSITY = 0.5      # what generate and chat prune without --sparsity


def register(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    p = add_parser("generate", help="generate text from a prompt, dense or pruned",
                              description="Generate a continuation of PROMPT (or --prompt, --prompt-file, or stdin).")
    p.add_argument("prompt", nargs="?", help="the prompt; '-' or omitted reads stdin")
    p.add_argument("-p", "--prompt", dest="prompt_option", metavar="PROMPT", help="the prompt (as the argument)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or Hugging Face id")
    p.add_argument("--method", default="dart", choices=sorted(METHODS))
    p.add_argument("--sparsity", type=float, help="fraction of FFN neurons removed, in [0, 1) (default "
                                                 f"{DEFAULT_SPARSITY}; not for --method dense)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--loop", default="auto", choices=["auto", "native", "hf"],
                   help="decode loop: dartprune's native loop (Llama and Gemma families; auto picks it where it "
                        "runs) or Hugging Face generate")
    p.add_argument("--compare-dense", action="store_true",
                   help="then time the reply against a dense loop decoding in turn with it and print the speedup "
                        "(dense time per output token over the pruned one's, as `dartprune bench`)")
    p.add_argument("--no-stream", action="store_true", help="print the text only at the end")
    p.add_argument("--calibration-file", help="for wanda-static and threshold (see `dartprune calibrate`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other DartConfig field, e.g. --set window=8 --set trigger_count=3")
    p.add_argument("--trace-plot", help="write a PNG of the drift monitor's window cosines and re-traces")
    p.set_defaults(run=run)


def read_prompt(args: argparse.Namespace) -> str:
    given = args.prompt if args.prompt_option is None else args.prompt_option
    if args.prompt_option is not None and (args.prompt is not None or args.prompt_file):
        raise ValueError("give the prompt once: as an argument, with --prompt or with --prompt-file")
    if args.prompt_file:
        if given not in (None, "-"):
            raise ValueError("give the prompt as an argument or with --prompt-file, not both")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    elif given is None or given == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no prompt: give it as an argument, with --prompt or --prompt-file, or on stdin")
        prompt = sys.stdin.read()
        if prompt.endswith("\n"):        # `echo text |` adds one; the same text as an argument has none
            prompt = prompt[:-2] if prompt.endswith("\r\n") else prompt[:-1]
    else:
        prompt = given
    if not check_text(prompt, "the prompt").strip():
        raise ValueError("the prompt is empty")
    return prompt


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        if not has_chat_template(tokenizer):
            raise ValueError("--chat: this model's tokenizer has no chat template")
        ids = torch.tensor([render_chat(tokenizer, [{"role": "user", "content": prompt}])])
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    return ids


def config_from(args: argparse.Namespace) -> DartConfig:
    """The DartConfig that generate's and chat's options name (--method, --sparsity, --seed, --calibration-file,
    --set)."""
    if not METHODS[args.method].prunes and (args.sparsity is not None or args.set):
        raise ConfigError(f"--method {args.method} prunes nothing: --sparsity and --set would change nothing")
    sparsity = DEFAULT_SPARSITY if args.sparsity is None else args.sparsity
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in [0, 1), got {sparsity}")
    settings = parse_settings(args.set)
    check_no_method_or_sparsity(settings, "--method")
    config = DartConfig.from_dict({"method": args.method, "sparsity": sparsity, "seed": args.seed,
                                   "calibration_file": args.calibration_file, **settings})
    if config.calibration_file and METHODS[config.method].calibration is None:
        raise ValueError(f"--calibration-file is for the calibrated methods; --method {config.method} takes none")
    return config


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    config = config_from(args)
    method = METHODS[config.method]
    if args.trace_plot and not method.follows_drift:
        raise ValueError(f"--trace-plot draws the drift monitor, which --method {config.method} does not run "
                         "(dart does)")
    if args.compare_dense and (not method.prunes or config.sparsity == 0):
        what = f"{config.method} at sparsity 0" if method.prunes else config.method
        raise ValueError(f"--compare-dense times a pruned method against dense; {what} prunes nothing")
    if args.compare_dense and args.max_new_tokens < 2:
        raise ValueError("--compare-dense times decode steps per output token: it needs --max-new-tokens >= 2")
    if args.trace_plot:
        from dartprune.plots import check_image_path
        check_image_path(args.trace_plot)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    prompt = read_prompt(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    ids = encode_prompt(tokenizer, prompt, args.chat)[0]

    def show(text: str) -> None:
        print(text, end="", flush=True)

    with Generator(model, tokenizer, config, loop=args.loop) as generator:
        result = generator.generate(ids, params, None if args.no_stream else show)
        print(result.text if args.no_stream else "")
        tokens = len(result.tokens)
        compare = args.compare_dense and tokens >= 2          # one token has no decode step to time
        paired = None
        if compare and generator.native is not None:
            from dartprune.benchmarks.speed import paired_speedup
            paired = paired_speedup(generator.native, ids, tokens)
    stats = result.stats
    count = len(result.tokens)
    line = (f"[{count} token{'s' if count != 1 else ''} in {result.ttft_s + result.decode_s:.2f} s, "
            f"{result.tokens_per_s:.1f} tokens/s, {generator.loop} loop | {stats.summary()}")
    if paired is not None:
        line += f" | speedup over dense {paired:.2f}x per output token (greedy, {tokens} tokens each, a dense loop " \
                "decoding in turn with the pruned one as in `dartprune bench`)"
    elif compare:
        with Generator(model, tokenizer, None, loop=args.loop) as dense:
            reference = dense.generate(ids, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
        line += f" | speedup over dense {speedup(reference, result):.2f}x per output token ({len(reference.tokens)} " \
                "dense tokens after the reply, same loop)"
    if args.compare_dense and not compare:
        line += " | speedup over dense not measured: the reply has one token, no decode step"
    print(line + "]", file=sys.stderr)
    if args.trace_plot:
        from dartprune.plots import plot_drift_trace
        print(f"[drift trace written to {plot_drift_trace(stats, args.trace_plot)}]", file=sys.stderr)
    return 0


def speedup(dense: Generation, pruned: Generation) -> float:
    """Dense time per output token over the pruned one's, as `dartprune bench` computes it."""
    return dense.tpot_s / pruned.tpot_s if pruned.tpot_s else float("nan")
