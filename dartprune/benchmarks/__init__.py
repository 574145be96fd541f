"""Speed benchmark (`dartprune bench`) and what the standalone scripts in benchmarks/ share."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch


def publish(lines: list[str], out: Path | None) -> None:
    """Print a script's markdown result and write it to `out` (its folder made) when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def timing_setup(model_name: str, threads: int, prompt_tokens: int, text: str):
    """What the timing scripts start from: the thread count, the model and its tokenizer, and a prompt of
    `prompt_tokens` tokens of `text` ([tokens])."""
    from dartprune.benchmarks.speed import make_prompt
    from dartprune.data import load_text
    from dartprune.models import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_name)
    return model, tokenizer, make_prompt(tokenizer, prompt_tokens, load_text(text).text)[0]


def run_in_checkout(source: Path, code: str) -> dict:
    """Run `code` (which prints a JSON object as its last line) in a fresh process on the dartprune of checkout
    `source` (another commit's worktree, to compare with this one), and return that object. The process starts in
    `source`, since `python -c` puts its working folder first on the path; that it imported `source/dartprune` is
    checked."""
    code = f"import dartprune as _checked\nprint(_checked.__file__)\n{code}"
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=source)
    if done.returncode:
        raise SystemExit(f"the process for {source} failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    if Path(lines[0]).resolve() != (Path(source) / "dartprune" / "__init__.py").resolve():
        raise SystemExit(f"the process for {source} imported the dartprune of {lines[0]}")
    return json.loads(lines[-1])


def script_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script has: the model and the markdown file to write."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path)
    return parser


def checkouts_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options of the scripts that compare checkouts, one fresh process each (`run_in_checkout`)."""
    parser = script_parser(description)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--source", type=Path, action="append",
                        help="checkout(s) whose dartprune to run (default: this one); give several to compare")
    return parser


def revision(source: Path) -> str:
    """A checkout's commit (short), or its folder's name outside git."""
    done = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or Path(source).resolve().name


def drift_parser(description: str, threads: int = 1) -> argparse.ArgumentParser:
    """The options every script that studies the drift benchmark takes (each adds its own, --sparsity included)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prefix", type=int, default=128)
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--split", default="tune", choices=["tune", "test", "all"])
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--out", type=Path)
    return parser


def drift_setup(args: argparse.Namespace) -> tuple[torch.nn.Module, list]:
    """Threads, the model, and the drift sequences that `drift_parser`'s options select."""
    from dartprune.evaluation.core import needs_bos_every_window
    from dartprune.evaluation.drift import drift_sequences
    from dartprune.models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    bos = tokenizer.bos_token_id if needs_bos_every_window(model) else None
    return model, drift_sequences(tokenizer, args.prefix, args.segment, bos=bos, split=args.split)


@torch.no_grad()
def teacher_force(native, ids: list[int], prefix: int, chunk: int) -> torch.Tensor:
    """One drift sequence through a `NativeModel`: ids[:prefix] as a new prompt, then the rest but the last token
    through the cache, `chunk` tokens at a time (what the scripts record their signals from). Returns the logits
    [len(ids) - 1, vocab]: row i predicts ids[i + 1]."""
    from dartprune.evaluation.core import forced_pieces

    tokens = torch.tensor(ids)
    native.reset()
    return torch.cat([native.forward(tokens[start:end]) for start, end in forced_pieces(len(ids), prefix, chunk)])


class AttentionRecorder:
    """Keeps what an engine's drift monitor is shown (the attention output of each monitored layer, by its index
    in `engine.monitored`), for the drift scripts to study detectors offline."""

    def __init__(self, engine) -> None:
        self.captured: dict[int, list[torch.Tensor]] = {}
        observe = engine.observe_attention

        def keep(j: int, output: torch.Tensor) -> None:
            self.captured.setdefault(j, []).append(output.reshape(-1, output.shape[-1]).float().clone())
            observe(j, output)

        engine.observe_attention = keep

    def take(self) -> list[torch.Tensor]:
        """Per monitored layer, every token's output since the last call ([tokens, hidden])."""
        out = [torch.cat(self.captured[j]) for j in sorted(self.captured)]
        self.captured.clear()
        return out


class Triggers:
    """A simulated detector's triggers counted as the drift benchmark counts them: one before the switch or anywhere
    in a control is false (a rate per 1,000 of those tokens); a switch is caught when the first trigger after it
    comes within the detection window."""

    def __init__(self) -> None:
        self.false = self.tokens = 0
        self.delays: list[int | None] = []          # per switch sequence, tokens from the switch to its first trigger
        self._first: int | None = None

    def fire(self, kind: str, position: int, switch: int) -> None:
        if kind == "control" or position <= switch:
            self.false += 1
        elif self._first is None:
            self._first = position - switch

    def end(self, kind: str, unchanged_tokens: int) -> None:
        """The sequence is over; `unchanged_tokens`: a control's tokens, a switch sequence's before the switch."""
        self.tokens += unchanged_tokens
        if kind != "control":
            self.delays.append(self._first)
        self._first = None

    def result(self) -> dict:
        from dartprune.evaluation.drift import DETECTION_WINDOW

        delays = [d for d in self.delays if d is not None]
        return {"false_per_1k": 1000 * self.false / self.tokens if self.tokens else math.nan,
                "detected_64": sum(d is not None and d <= DETECTION_WINDOW for d in self.delays) / len(self.delays)
                if self.delays else math.nan,
                "median_delay": statistics.median(delays) if delays else math.nan}

    HEADER = "false per 1k tokens | detected within 64 | median delay |"

    @staticmethod
    def cells(result: dict) -> str:
        """`result`'s figures as the last cells of a markdown row under HEADER."""
        return f"{result['false_per_1k']:.2f} | {result['detected_64']:.2f} | {result['median_delay']:g} |"
