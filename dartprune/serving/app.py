"""An OpenAI-compatible HTTP server for one model, dense or pruned: `/v1/chat/completions` and `/v1/completions`
(streamed as server-sent events or not), `/v1/models` and `/health`.

Requests run one after another on the model (a lock); each is a new sequence, so nothing of one request reaches
another. DART settings come from the command line and can be changed per request with the extra field
`"dartprune": {"method": ..., "sparsity": ..., ...}` (any DartConfig field); the response carries the usual usage
counts and, under `"dartprune"`, the engine's figures for that request (a list of them, one per prompt, for a
completion request with several prompts: those run one after another, each its own choice). Errors are
OpenAI-style JSON with a 4xx status, and the server keeps serving. OpenAI options it does not implement
(logprobs, echo, penalties, logit bias, tools, ...) are refused unless set to their neutral value, and so is any
option it does not know; `top_k` is taken as other local servers take it; a client that disconnects stops its
generation; per-request settings cannot name server-side files (calibration_file).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from dartprune.decode.chat import has_chat_template, render_chat
from dartprune.decode.generate import Generation, Generator, SamplingParams, check_text
from dartprune.engine import DartConfig
from dartprune.engine.config import ConfigError
from dartprune.methods import METHODS
from dartprune.models import ContextError, check_context, context_limit

DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


# request text that a tokenizer can take (a JSON escape of half a UTF-16 pair cannot be encoded)
Text = Annotated[str, AfterValidator(lambda text: check_text(text, "the text"))]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ClientGone(Exception):
    """The client closed its request; nothing is left to answer."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]   # developer: OpenAI's newer name for system
    content: Text | list[TextPart]          # a string, or OpenAI's list of content parts (text ones only)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")       # an option nobody reads would be silently ignored
    model: str
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1, strict=True)   # as other local servers take it; 0, -1: off
    n: int = Field(default=1, strict=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, strict=True)
    dartprune: dict[str, Any] | None = None
    # OpenAI options that change nothing in the answer of a server that stores nothing and calls no tools
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI options this server does not implement: accepted at their neutral value, refused otherwise
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> _Common:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def unsupported(self) -> list[str]:
        """The options set that this server would otherwise ignore."""
        return [name for name, neutral in UNSUPPORTED.items()
                if name in type(self).model_fields and getattr(self, name) not in neutral]


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Common):
    # one prompt, several (each its own choice, in order), as text or as token ids: the forms OpenAI's API takes
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


# option -> its values that ask for nothing (anything else is refused: a silently ignored option is a wrong answer)
UNSUPPORTED: dict[str, tuple] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "logprobs": (None, False), "top_logprobs": (None, 0),
    "echo": (False,), "best_of": (None, 1), "suffix": (None, ""),
}


@dataclass
class ModelServer:
    """The model, its tokenizer and the generator for the settings last asked for (built again when a request
    asks for other settings); `lock` serves requests one after another."""

    model: Any
    tokenizer: Any
    name: str
    config: DartConfig
    loop: str = "auto"
    lock: threading.Lock = field(default_factory=threading.Lock)
    _generator: Generator | None = None

    def settings(self, overrides: dict[str, Any] | None) -> DartConfig:
        overrides = dict(overrides or {})
        if "calibration_file" in overrides:         # a client must not make the server open paths of its choice
            raise APIError(400, "dartprune settings: calibration_file is set when the server starts "
                                "(serve --set calibration_file=FILE), not per request", param="dartprune")
        method = overrides.get("method")
        if isinstance(method, str) and method in METHODS and not METHODS[method].prunes and len(overrides) > 1:
            others = sorted(set(overrides) - {"method"})       # as generate refuses --sparsity with --method dense
            raise APIError(400, f"dartprune settings: method {method!r} prunes nothing, so {others} would change "
                                "nothing", param="dartprune")
        try:
            return DartConfig.from_dict({**dataclasses.asdict(self.config), **overrides})
        except (ConfigError, TypeError) as err:
            raise APIError(400, f"dartprune settings: {err}", param="dartprune") from err

    def generator(self, config: DartConfig) -> Generator:
        if self._generator is None or self._generator.config != config:
            self.close()             # a build that fails (settings only the engine can check) leaves none behind
            self._generator = Generator(self.model, self.tokenizer, config, loop=self.loop)
        return self._generator

    def build(self, config: DartConfig) -> None:
        """The generator for `config` now: settings only the engine can check fail here (a streamed request
        checks them before its response starts)."""
        with self.lock:
            self.generator(config)

    def run(self, ids: torch.Tensor, params: SamplingParams, config: DartConfig, on_text=None,
            should_stop=None) -> Generation:
        with self.lock:
            if should_stop is not None and should_stop():        # the client left while the request waited
                raise ClientGone("the client closed the request before it ran")
            return self.generator(config).generate(ids, params, on_text, should_stop)

    def close(self) -> None:
        if self._generator is not None:
            self._generator.close()
            self._generator = None


def _params(request: _Common, max_tokens: int | None) -> SamplingParams:
    if request.n != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    unsupported = request.unsupported()
    if unsupported:
        raise APIError(400, f"this server does not support {', '.join(unsupported)}", param=unsupported[0])
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                              top_k=max(request.top_k or 0, 0), seed=request.seed, stop=tuple(stop))
    except ValueError as err:
        raise APIError(400, str(err)) from err


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _figures(result: Generation, config: DartConfig) -> dict[str, Any]:
    stats = result.stats
    return {"method": config.method, "sparsity": config.pruned_sparsity, "loop": result.loop,
            "executed_sparsity": round(stats.executed_sparsity, 4), "retraces": stats.retrace_count,
            "state_bytes": stats.state_bytes, "tokens_per_s": round(result.tokens_per_s, 2)}


def create_app(server: ModelServer) -> FastAPI:
    """The FastAPI application serving `server`'s model."""
    app = FastAPI(title="dartprune", description=__doc__.splitlines()[0])

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:
        return APIError(500, f"{type(err).__name__}: {err}", kind="server_error").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        # a union's members each report; the one our own checks raised says most
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
        where = ".".join(str(p) for p in first.get("loc", ())[1:] if "[" not in str(p)) or None  # not union tags
        kind = first.get("type", "")
        if kind == "json_invalid":
            return APIError(400, "the body is not valid JSON").response()
        content_type = request.headers.get("content-type", "")
        if where is None and kind == "model_attributes_type" and "json" not in content_type.lower():
            # FastAPI reads a body as JSON only when it is declared so (curl -d sends form encoding by default)
            return APIError(400, "send the body as JSON with the header Content-Type: application/json (this request "
                                 f"declared {content_type or 'no content type'})").response()
        if kind == "extra_forbidden":
            return APIError(400, f"this server does not know the option {where}", param=where).response()
        return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None
                        ).response()

    def check_model(name: str) -> None:
        if name != server.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {server.name!r}",
                           param="model", code="model_not_found")

    def encode_chat(request: ChatRequest) -> torch.Tensor:
        if not request.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        if not has_chat_template(server.tokenizer):
            raise APIError(400, f"{server.name} has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        return torch.tensor(render_chat(server.tokenizer, messages), dtype=torch.long)

    def encode_prompts(request: CompletionRequest) -> list[torch.Tensor]:
        """The request's prompts as token ids, each checked: text is tokenized, ids must be the model's."""
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        vocabulary = server.model.get_input_embeddings().num_embeddings
        prompts = []
        for i, one in enumerate(prompt):
            name = "prompt" if len(prompt) == 1 else f"prompt {i}"
            if not one:
                raise APIError(400, f"{name} must not be empty", param="prompt")
            if isinstance(one, str):
                one = server.tokenizer(one).input_ids
            elif not all(0 <= t < vocabulary for t in one):
                raise APIError(400, f"{name}: token ids must be in [0, {vocabulary}) for {server.name}",
                               param="prompt")
            prompts.append(torch.tensor(one, dtype=torch.long))
        return prompts

    def prepare(request: _Common, ids: torch.Tensor, max_tokens: int) -> tuple[SamplingParams, DartConfig]:
        params = _params(request, max_tokens)
        config = server.settings(request.dartprune)
        try:
            check_context(server.model, ids.numel() + params.max_new_tokens,
                          f"this request's {ids.numel()} prompt tokens and {params.max_new_tokens} new tokens")
        except ContextError as err:
            too_long = ids.numel() >= context_limit(server.model)      # the prompt alone, whatever max_tokens says
            raise APIError(400, str(err), param=None if too_long else "max_tokens",
                           code="context_length_exceeded") from err
        return params, config

    async def watch(http: Request, stop: threading.Event) -> None:
        """Set `stop` when the client goes away, so that its generation ends at the next token (a long reply nobody
        reads would hold the model from every other request)."""
        while not stop.is_set():
            if await http.is_disconnected():
                stop.set()
            await asyncio.sleep(0.25)

    async def run(http: Request, ids, params, config) -> Generation:
        stop = threading.Event()
        watcher = asyncio.create_task(watch(http, stop))
        try:
            return await asyncio.to_thread(server.run, ids, params, config, None, stop.is_set)
        except ValueError as err:
            raise APIError(400, str(err)) from err
        except ClientGone as err:          # answered to nobody (499: nginx's "client closed request")
            raise APIError(499, str(err)) from err
        finally:
            stop.set()
            watcher.cancel()

    async def stream(http: Request, prompts: list[torch.Tensor], params, config, chunk, final,
                     include_usage: bool) -> StreamingResponse:
        """Server-sent events: for each prompt in turn (choice `index`), a chunk per piece of text and the finish
        reason; then usage if asked, and [DONE]. Settings that only the engine can check are checked first, so that
        they get a 400 and not an error event."""
        try:
            await asyncio.to_thread(server.build, config)
        except ValueError as err:
            raise APIError(400, str(err)) from err
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                for index, ids in enumerate(prompts):
                    result = server.run(ids, params, config, should_stop=stop.is_set,
                                        on_text=lambda text, index=index: pieces.put(("text", (index, text))))
                    pieces.put(("done", (index, result)))
            except Exception as err:  # noqa: BLE001 - reported in the stream, the server goes on
                pieces.put(("error", err))

        async def events() -> AsyncIterator[str]:
            threading.Thread(target=work, daemon=True).start()
            watcher = asyncio.create_task(watch(http, stop))
            try:
                first = chunk(0, None, None)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                results: list[Generation] = []
                while len(results) < len(prompts):
                    try:
                        kind, value = await asyncio.to_thread(pieces.get, True, 0.5)
                    except queue.Empty:
                        continue
                    if kind == "text":
                        yield f"data: {json.dumps(chunk(*value, None))}\n\n"
                    elif kind == "error":
                        body = {"error": {"message": str(value), "type": "server_error", "param": None,
                                          "code": None}}
                        yield f"data: {json.dumps(body)}\n\n"
                        break
                    else:
                        index, result = value
                        results.append(result)
                        yield f"data: {json.dumps(chunk(index, None, _finish(result.finish_reason)))}\n\n"
                if include_usage and len(results) == len(prompts):
                    yield f"data: {json.dumps(final(results))}\n\n"
                yield "data: [DONE]\n\n"
            finally:                  # done, or the response was cancelled because the client went away
                stop.set()
                watcher.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": server.name}

    def model_card() -> dict[str, Any]:
        return {"id": server.name, "object": "model", "created": 0, "owned_by": "dartprune"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest, http: Request):
        check_model(request.model)
        ids = encode_chat(request)
        params, config = prepare(request, ids, request.max_completion_tokens or request.max_tokens
                                 or DEFAULT_MAX_TOKENS)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(result: Generation) -> dict[str, int]:
            return {"prompt_tokens": ids.numel(), "completion_tokens": len(result.tokens),
                    "total_tokens": ids.numel() + len(result.tokens)}

        if request.stream:
            def chunk(index, text, reason):
                delta = {"role": "assistant", "content": ""} if text is None and reason is None else (
                    {"content": text} if text is not None else {})
                return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": server.name,
                        "choices": [{"index": index, "delta": delta, "finish_reason": reason}]}

            def final(results):
                return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": server.name,
                        "choices": [], "usage": usage(results[0]), "dartprune": _figures(results[0], config)}

            include = bool(request.stream_options and request.stream_options.include_usage)
            return await stream(http, [ids], params, config, chunk, final, include)
        result = await run(http, ids, params, config)
        return {"id": ident, "object": "chat.completion", "created": created, "model": server.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": _finish(result.finish_reason)}],
                "usage": usage(result), "dartprune": _figures(result, config)}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        """One choice per prompt, generated one after another (a list of prompts is a batch to OpenAI's API)."""
        check_model(request.model)
        prompts = encode_prompts(request)
        params, config = [prepare(request, ids, request.max_tokens or 16) for ids in prompts][0]   # each checked
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(results: list[Generation]) -> dict[str, int]:
            prompt_tokens = sum(ids.numel() for ids in prompts)
            completion_tokens = sum(len(result.tokens) for result in results)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        def figures(results: list[Generation]) -> dict[str, Any] | list[dict[str, Any]]:
            """The engine's figures: of the request's one prompt, or a list in the order of its prompts."""
            each = [_figures(result, config) for result in results]
            return each[0] if len(prompts) == 1 else each

        if request.stream:
            def chunk(index, text, reason):
                if text is None and reason is None:
                    return None
                return {"id": ident, "object": "text_completion", "created": created, "model": server.name,
                        "choices": [{"index": index, "text": text or "", "finish_reason": reason,
                                     "logprobs": None}]}

            def final(results):
                return {"id": ident, "object": "text_completion", "created": created, "model": server.name,
                        "choices": [], "usage": usage(results), "dartprune": figures(results)}

            include = bool(request.stream_options and request.stream_options.include_usage)
            return await stream(http, prompts, params, config, chunk, final, include)
        results = [await run(http, ids, params, config) for ids in prompts]
        return {"id": ident, "object": "text_completion", "created": created, "model": server.name,
                "choices": [{"index": i, "text": result.text, "finish_reason": _finish(result.finish_reason),
                             "logprobs": None} for i, result in enumerate(results)],
                "usage": usage(results), "dartprune": figures(results)}

    return app
