"""The OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

`add_openai_api(app, config, view, metrics)` adds them to the daemon's app (docs/serving.md):

- Every answer comes from `view.generate`, which holds one whole version of the live weights for the
  whole generation (a commit or revert waits for it); the headers ``X-KED-Model-Version`` and
  ``X-KED-Weights-SHA256`` and the body's ``system_fingerprint`` say which version answered.
- ``stream: true`` answers with server-sent events (``data: {chunk}`` ..., then ``data: [DONE]``). The
  generation runs in a worker thread and hands its text over through `_Events`; the headers go out
  once the version is pinned, so they name it too. A client that goes away stops the generation.
- Errors on these paths are OpenAI's shape with the usual status codes (`daemon.openai_guards`), the
  API's size and rate limits included; the other routes keep the daemon's ``{"detail": ...}``.
- With ``api.read_token`` set, these routes and POST /v1/query need a bearer token (`ReadToken`).

The routes are left out of the daemon's OpenAPI schema: their contract is OpenAI's API reference.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.middleware import Middleware

from daemon.api_guards import json_body
from daemon.config import ApiConfig
from daemon.generation import TokenLogprob
from daemon.metrics import Metrics
from daemon.openai_guards import OpenAIErrorShape, ReadToken
from daemon.openai_models import (
    ChatCompletionRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    ModelCard,
    ModelList,
    OpenAIError,
    ResponseShape,
    Unsupported,
)
from daemon.served_model import GenerationRequest, GenerationSink, ServedGeneration, ServedVersion
from daemon.service_view import InvalidInput, ServiceView, ViewError

log = structlog.get_logger(__name__)

OPENAI_PATHS = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions"})
#: What `api.read_token` guards: reading the model, through either API.
READ_TOKEN_PATHS = OPENAI_PATHS | {"/v1/query"}
VERSION_HEADER = "X-KED-Model-Version"
WEIGHTS_HEADER = "X-KED-Weights-SHA256"

Body = TypeVar("Body", bound=BaseModel)


def add_openai_api(app: FastAPI, config: ApiConfig, view: ServiceView, metrics: Metrics) -> None:
    """Add the routes, their error shape and the read token to `app`; call it after the API's own middlewares."""
    app.include_router(openai_router(config, view, metrics))

    async def answer_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    app.add_exception_handler(OpenAIError, answer_error)
    if config.read_token is not None:
        tokens = (config.read_token,) + ((config.token,) if config.token is not None else ())
        # Innermost, unlike add_middleware: the size and rate limits and the request metrics see its refusals.
        app.user_middleware.append(Middleware(ReadToken, tokens=tokens, paths=READ_TOKEN_PATHS))
    # Outermost: it rewrites the limits' refusals too.
    app.add_middleware(OpenAIErrorShape, paths=OPENAI_PATHS)


def openai_router(config: ApiConfig, view: ServiceView, metrics: Metrics) -> APIRouter:
    """The three routes over `view`; token budgets at most `config.max_new_tokens`."""
    router = APIRouter(tags=["openai"], include_in_schema=False)
    listed_at = int(time.time())

    @router.get("/v1/models")
    async def list_models() -> Response:
        served = await _from_view(view.served_model)
        card = ModelCard(
            id=served.model_id, created=listed_at, model_version=served.version,
            weights_sha256=served.weights_sha256, max_model_len=served.context_length,
        )
        return JSONResponse(ModelList(data=[card]).model_dump(mode="json"), headers=version_headers(served))

    @router.post("/v1/chat/completions", dependencies=[Depends(json_body)])
    async def chat_completions(request: Request) -> Response:
        body = await _parsed(request, ChatCompletionRequest)
        shape = ChatShape(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), bool(body.logprobs))
        return await _answer(view, metrics, _generation(body, config.max_new_tokens), shape, body)

    @router.post("/v1/completions", dependencies=[Depends(json_body)])
    async def completions(request: Request) -> Response:
        body = await _parsed(request, CompletionRequest)
        shape = CompletionShape(f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.logprobs is not None)
        return await _answer(view, metrics, _generation(body, config.max_new_tokens), shape, body)

    return router


def version_headers(served: ServedVersion) -> dict[str, str]:
    return {VERSION_HEADER: str(served.version), WEIGHTS_HEADER: served.weights_sha256}


async def _parsed(request: Request, model: type[Body]) -> Body:
    """The body as `model` (json_body has checked that it is JSON); 400 naming the first bad parameter."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        problem = "unknown parameter" if error["type"] == "extra_forbidden" else error["msg"]
        raise OpenAIError(400, f"{param}: {problem}" if param else problem, param=param) from None


def _generation(body: ChatCompletionRequest | CompletionRequest, token_limit: int) -> GenerationRequest:
    try:
        return body.to_generation(token_limit)
    except Unsupported as exc:
        raise OpenAIError(400, str(exc), param=exc.param, code="unsupported_parameter") from None


def openai_error(exc: BaseException) -> OpenAIError:
    """`exc` as an OpenAI error: a view's refusal keeps its status (422 becomes OpenAI's 400), anything else is a 500."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ViewError):
        message = str(exc)
        head = message.split(":", 1)[0]
        param = head if ":" in message and head.isidentifier() else None  # the daemon's messages start "field: ..."
        status = 400 if isinstance(exc, InvalidInput) else exc.status_code
        return OpenAIError(status, message, param=param, code=getattr(exc, "code", None))
    return OpenAIError(500, "the generation failed; the daemon's log has the details")


async def _from_view(call: Callable[..., Any], *args: Any) -> Any:
    try:
        return await run_in_threadpool(call, *args)
    except ViewError as exc:
        raise openai_error(exc) from None


async def _answer(
    view: ServiceView,
    metrics: Metrics,
    request: GenerationRequest,
    shape: ResponseShape,
    body: ChatCompletionRequest | CompletionRequest,
) -> Response:
    started = time.perf_counter()
    if body.stream:
        return await _stream(view, metrics, request, shape, body.include_usage)
    result: ServedGeneration = await _from_view(view.generate, request)
    metrics.observe_query(seconds=time.perf_counter() - started, generated_tokens=result.generation.completion_tokens)
    return JSONResponse(shape.answer(result).model_dump(mode="json"), headers=version_headers(result.served))


# --- streaming -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pinned:
    served: ServedVersion


@dataclass(frozen=True)
class _Piece:
    delta: str
    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class _Done:
    result: ServedGeneration


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_Event = _Pinned | _Piece | _Done | _Failed


class _Events(GenerationSink):
    """The sink of a generation in a worker thread: what it produces is queued for the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._stop = threading.Event()
        self.started = time.perf_counter()

    def produce(self, generate: Callable[[GenerationRequest, GenerationSink], ServedGeneration], request: GenerationRequest) -> None:
        """Run in the worker thread: the generation, then `_Done`, or `_Failed` with whatever it raised."""
        try:
            self._put(_Done(generate(request, self)))
        except Exception as exc:  # handed to the event loop, which answers it: a worker thread has no one else to tell
            self._put(_Failed(exc))

    def pinned(self, served: ServedVersion) -> None:
        self._put(_Pinned(served))

    def text(self, delta: str, logprobs: Sequence[TokenLogprob]) -> None:
        self._put(_Piece(delta, tuple(logprobs)))

    def cancelled(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        self._stop.set()

    async def next(self) -> _Event:
        return await self._queue.get()

    def _put(self, event: _Event) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)


async def _stream(
    view: ServiceView, metrics: Metrics, request: GenerationRequest, shape: ResponseShape, include_usage: bool
) -> Response:
    events = _Events(asyncio.get_running_loop())
    worker = asyncio.ensure_future(run_in_threadpool(events.produce, view.generate, request))
    first = await events.next()
    if isinstance(first, _Failed):
        if isinstance(first.error, ViewError | OpenAIError):
            raise openai_error(first.error)
        raise first.error
    assert isinstance(first, _Pinned), first
    chunks = _chunks(events, worker, shape, first.served, include_usage, metrics)
    return StreamingResponse(chunks, media_type="text/event-stream", headers=version_headers(first.served))


async def _chunks(
    events: _Events,
    worker: asyncio.Future[None],
    shape: ResponseShape,
    served: ServedVersion,
    include_usage: bool,
    metrics: Metrics,
) -> AsyncIterator[str]:
    """The server-sent events of one generation; `worker` is kept referenced until it ends."""
    finished = False
    try:
        for chunk in shape.opening(served):
            yield _sse(chunk)
        while True:
            event = await events.next()
            if isinstance(event, _Piece):
                yield _sse(shape.piece(served, event.delta, event.logprobs))
            elif isinstance(event, _Done):
                seconds = time.perf_counter() - events.started
                metrics.observe_query(seconds=seconds, generated_tokens=event.result.generation.completion_tokens)
                for chunk in shape.closing(event.result, include_usage):
                    yield _sse(chunk)
                finished = True
                yield "data: [DONE]\n\n"
                return
            elif isinstance(event, _Failed):
                # The headers are out: the error goes in the stream, where OpenAI's clients look for it.
                finished = True
                log.error("streamed generation failed", error=repr(event.error))
                yield f"data: {json.dumps(openai_error(event.error).body())}\n\n"
                return
    finally:
        if not finished and not worker.done():
            events.cancel()
            log.info("stream closed by the client before its generation ended; generation stopped")


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"
