"""`phitune serve`: an OpenAI Chat Completions server for one model, with request batching.

The protocol is the one unmodified clients speak (the official `openai` client, Azure serverless
endpoints, vLLM): POST /v1/chat/completions (also streamed as server-sent events ending in
`data: [DONE]`), GET /v1/models, plus GET /health (503 until the model is loaded, so a deployment can
wait for it) and GET /metrics (Prometheus). A bad request is answered with a 4xx and an OpenAI error
object, never a 500: the body is parsed and validated by hand rather than by FastAPI's body
parameters, whose 422 format no OpenAI client understands.

The model loads in a background thread after the port is open; generation runs in the
BatchingGenerator's single worker thread, and request handlers only wait on an asyncio queue.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from phitune.chat import prompt_ids
from phitune.errors import EndpointError
from phitune.serving.generator import BatchingGenerator, Event, Job, LoadedModel, load_model

log = logging.getLogger("phitune.serving")

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
MAX_STOP_STRINGS = 4  # as in the OpenAI API


@dataclass(frozen=True)
class ServerSettings:
    """What a server enforces; the model itself comes from the loader."""

    max_batch_size: int = 8
    max_new_tokens: int = 256  # the most max_tokens a client may ask for (and the default)
    max_request_bytes: int = 1 << 20
    batch_wait_s: float = 0.005
    api_key: str | None = None  # the key itself (read from the env var named in the config)


# ---------------------------------------------------------------- the request, as OpenAI defines it

class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... are accepted and ignored

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields phitune honours; other OpenAI fields (user, logprobs, ...) are accepted and ignored.

    Unset temperature/top_p follow the model's generation config, as vLLM's `--generation-config auto`
    does: greedy for a model that does not sample by default (SmolLM2, the tiny test models).
    """

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty stop strings")
        return stops


class ApiError(Exception):
    """An error answered as an OpenAI error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _loc(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role' (the param name OpenAI errors use)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("str", "list[", "function-")):  # pydantic's union-branch names
            out += f".{part}" if out else str(part)
    return out


def parse_request(raw: bytes) -> ChatRequest:
    """Body bytes -> ChatRequest, or an ApiError 400 naming the bad field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = _loc(first["loc"])
        got = "" if first["type"] == "missing" else f" (got {first.get('input')!r:.80})"
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise ApiError(400, f"{param}: {first['msg']}{got}", param=param, code=code) from None


# ---------------------------------------------------------------- metrics

class ServerMetrics:
    """Prometheus metrics in a registry of their own (several servers can live in one test process)."""

    def __init__(self, max_batch_size: int) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("phitune_requests", "HTTP requests to /v1 by path and status", ["path", "status"], registry=r)
        self.errors = Counter("phitune_request_errors", "Error responses by OpenAI error type", ["type"], registry=r)
        self.latency = Histogram(
            "phitune_request_latency_seconds", "Time to the last byte of a /v1 response", ["path"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
        )
        self.prompt_tokens = Counter("phitune_prompt_tokens", "Prompt tokens of completed requests", registry=r)
        self.completion_tokens = Counter("phitune_completion_tokens", "Generated tokens", registry=r)
        self.batch_size = Histogram(
            "phitune_batch_size", "Requests in each forward pass of the model (prefill or decode step)", registry=r,
            buckets=tuple(range(1, max_batch_size + 1)),
        )
        self.ready = Gauge("phitune_model_ready", "1 once the model is loaded", registry=r)


class _Instrument:
    """ASGI middleware: count and time every /v1 request to its last byte (streams included)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in (CHAT_PATH, MODELS_PATH) else "other"
        status, start = 500, time.perf_counter()

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


# ---------------------------------------------------------------- the app

class _State:
    """What the handlers share: the loaded model and generator once ready, or why loading failed."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.loaded: LoadedModel | None = None
        self.generator: BatchingGenerator | None = None
        self.load_error: str | None = None


def create_app(
    loader: Callable[[], LoadedModel],
    settings: ServerSettings | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The server for whatever `loader` returns; loading starts in a thread when the app starts up."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(settings.max_batch_size)
    state = _State(settings, metrics)

    def load() -> None:
        try:
            loaded = loader()
            generator = BatchingGenerator(
                loaded, settings.max_batch_size, settings.batch_wait_s, on_step=metrics.batch_size.observe
            )
            generator.start()
        except BaseException as exc:  # reported by /health; the CLI exits on it
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading the model failed: %s", state.load_error)
            if on_load_error:
                on_load_error(exc)
            return
        state.loaded, state.generator = loaded, generator
        metrics.ready.set(1)
        log.info("model %s (version %s) ready", loaded.name, loaded.version or "-")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="phitune-loader", daemon=True).start()
        yield
        if state.generator:
            await asyncio.to_thread(state.generator.stop)

    app = FastAPI(title="phitune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.phitune = state
    app.add_middleware(_Instrument, metrics=metrics)

    def error_response(err: ApiError) -> JSONResponse:
        metrics.errors.labels(err.type).inc()
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("api-key", "")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send Authorization: Bearer <key>)", code="invalid_api_key")

    def ready() -> tuple[LoadedModel, BatchingGenerator]:
        if state.loaded is None or state.generator is None:
            raise ApiError(503, state.load_error or "the model is still loading", type="service_unavailable",
                           code="model_not_ready")
        return state.loaded, state.generator

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.loaded is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        loaded = state.loaded
        return JSONResponse({"status": "ok", "model": loaded.name, "version": loaded.version, "source": loaded.source})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(MODELS_PATH)
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        loaded, _ = ready()
        return {"object": "list", "data": [{"id": loaded.name, "object": "model", "created": 0, "owned_by": "phitune",
                                            "root": loaded.source, "version": loaded.version}]}

    @app.post(CHAT_PATH)
    async def chat(request: Request) -> Response:
        authorize(request)
        loaded, generator = ready()
        req = parse_request(await _read_body(request, settings.max_request_bytes))
        job, prompt_tokens = _make_job(req, loaded, settings)
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:  # called from the generator thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (server shutting down)
                job.cancelled = True

        job.emit = emit
        generator.submit(job)
        reply = _Reply(loaded.name, prompt_tokens, metrics)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(reply.sse(job, events, include_usage), media_type="text/event-stream")
        try:
            return JSONResponse(await reply.complete(events))
        finally:
            job.cancelled = True  # no-op when finished; stops the row if the client went away

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes (413) whether or not Content-Length is sent."""
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _make_job(req: ChatRequest, loaded: LoadedModel, settings: ServerSettings) -> tuple[Job, int]:
    """Render the prompt with the model's chat template and check the token budget (400 when over)."""
    messages = [m.as_template_message() for m in req.messages]
    try:
        prompt = prompt_ids(loaded.tokenizer, messages)
    except Exception as exc:  # a template that rejects this conversation (e.g. no system role) is a client error
        raise ApiError(400, f"messages: the model's chat template rejects them: {exc}", param="messages",
                       code="invalid_value") from None
    asked = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if asked is not None and asked > settings.max_new_tokens:
        raise ApiError(400, f"{param}: {asked} is more than this endpoint allows ({settings.max_new_tokens})",
                       param=param, code="integer_above_max_value")
    max_tokens = asked or settings.max_new_tokens
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
    if len(prompt) + (asked or 1) > context:
        raise ApiError(
            400, f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt) + (asked or 1)} tokens ({len(prompt)} in the messages, {asked or 1} in the completion).",
            param="messages", code="context_length_exceeded",
        )
    temperature, top_p = loaded.sampling_defaults()
    job = Job(
        prompt=prompt, max_tokens=min(max_tokens, context - len(prompt)), emit=lambda event: None,
        temperature=temperature if req.temperature is None else req.temperature,
        top_p=top_p if req.top_p is None else req.top_p, stop=tuple(req.stop or ()), seed=req.seed,
    )
    return job, len(prompt)


class _Reply:
    """Turns generator events into a chat.completion or a stream of chat.completion.chunk events."""

    def __init__(self, model: str, prompt_tokens: int, metrics: ServerMetrics) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.prompt_tokens, self.metrics = model, prompt_tokens, metrics

    def _usage(self, completion_tokens: int) -> dict[str, int]:
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.completion_tokens.inc(completion_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    async def complete(self, events: asyncio.Queue[Event]) -> dict[str, Any]:
        parts: list[str] = []
        while True:
            event = await events.get()
            if event[0] == "delta":
                parts.append(event[1])
            elif event[0] == "error":
                raise ApiError(500, event[1], type="server_error")
            else:
                _, reason, tokens = event
                return {
                    "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                 "finish_reason": reason, "logprobs": None}],
                    "usage": self._usage(tokens),
                }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    async def sse(self, job: Job, events: asyncio.Queue[Event], include_usage: bool) -> AsyncIterator[str]:
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if event[0] == "delta":
                    yield self._chunk({"content": event[1]})
                    continue
                if event[0] == "error":
                    self.metrics.errors.labels("server_error").inc()
                    yield f"data: {json.dumps(ApiError(500, event[1], type='server_error').body())}\n\n"
                else:
                    _, reason, tokens = event
                    yield self._chunk({}, reason)
                    usage = self._usage(tokens)
                    if include_usage:
                        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "choices": [], "usage": usage}
                        yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancelled = True  # the client may have gone away mid-stream


# ---------------------------------------------------------------- command line

def read_api_key(env_name: str | None) -> str | None:
    """The key from the named environment variable; an unset or empty variable is an error, not 'no auth'."""
    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise EndpointError(f"deployment.api_key_env: environment variable {env_name} is not set (or empty)")
    return key


def cli_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted; exit 1 when the model cannot be loaded (the reason is logged)."""
    import uvicorn

    from phitune.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    tracking_uri = args.tracking_uri or load_config().registry.tracking_uri
    settings = ServerSettings(
        max_batch_size=args.max_batch_size,
        max_new_tokens=args.max_new_tokens,
        max_request_bytes=args.max_request_bytes,
        api_key=read_api_key(args.api_key_env),
    )
    threads = args.threads
    if threads:
        import torch

        torch.set_num_threads(threads)
    server: uvicorn.Server | None = None

    def stop(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(lambda: load_model(args.model, tracking_uri), settings, on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10))
    server.run()
    error = app.state.phitune.load_error
    if error:
        raise EndpointError(f"cannot serve {args.model}: {error}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m phitune.serving.server ...`: what a deployment starts; the options of `phitune serve`."""
    from phitune.cli import main as phitune_main

    return phitune_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
