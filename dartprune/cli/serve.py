"""`dartprune serve`: an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models,
/health) for one model, dense or pruned; per-request DART settings in the extra field "dartprune"."""
from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
import sys

from dartprune.engine import DartConfig
from dartprune.engine.config import ConfigError, check_no_method_or_sparsity, parse_settings
from dartprune.methods import METHODS
from dartprune.models import DEFAULT_MODEL


def register(add_parser: Callable[..., argparse.ArgumentParser]) -> None:
    p = add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or Hugging Face id")
    p.add_argument("--name", help="the model name clients ask for (default: --model)")
    p.add_argument("--method", default="dart", choices=sorted(METHODS), help="default method of every request")
    p.add_argument("--sparsity", type=float, default=0.5, help="default FFN sparsity, in [0, 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other DartConfig field")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--loop", default="auto", choices=["auto", "native", "hf"])
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from dartprune.serving.app import ModelServer, create_app
    except ImportError as err:
        raise RuntimeError("`dartprune serve` needs FastAPI and uvicorn: pip install 'dartprune[serve]'") from err
    if not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    settings = parse_settings(args.set)
    check_no_method_or_sparsity(settings, "--method")
    config = DartConfig.from_dict({"method": args.method, "sparsity": args.sparsity, **settings})
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:   # before loading
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            raise RuntimeError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from err
    from dartprune.models import load_model
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    server = ModelServer(model, tokenizer, args.name or args.model, config, loop=args.loop)
    server.build(config)            # settings only the engine can check fail here, not in every request
    print(f"[serving {server.name} ({config.method} at sparsity {config.pruned_sparsity:g}) on "
          f"http://{args.host}:{args.port}/v1]", file=sys.stderr)
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        server.close()
    return 0
