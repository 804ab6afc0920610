"""What protects the HTTP API: the exposure rule, bearer tokens, body size and per-client rate limits.

- `check_exposure` is called by the service at start-up: write endpoints on a non-loopback address
  without a token are refused with `UnsafeExposure`, before anything binds.
- `bearer_guard` is the FastAPI dependency of the write endpoints.
- `json_body` is the dependency of every endpoint that takes a JSON body: 415 unless the body is
  sent as application/json, 400 unless it is valid JSON. `answer_validation_error` answers FastAPI's
  own validation errors the same way (400 for unreadable JSON, else 422) and never quotes a long
  input back.
- `BodyLimit`, `RateLimit` and `RequestMetrics` are plain ASGI middlewares (no buffering of
  responses, nothing per request beyond a few dictionary operations).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from fastapi import HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.config import ApiConfig, ConfigError
from daemon.metrics import Metrics
from ingest.documents import parse_json_document
from ingest.errors import DocumentError

#: Paths never rate-limited: probes and scrapes are cheap and must keep working under load.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: Clients remembered by the rate limiter; the least recently seen are forgotten beyond this.
MAX_TRACKED_CLIENTS = 10_000
#: Methods counted under their own name in ked_http_requests_total; others count as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The longest string a 422 answer quotes back as a field's `input`; a longer one is left out.
MAX_QUOTED_INPUT_CHARS = 100


#: The security scheme of the write endpoints (a plain object; creating it does no work).
BEARER = HTTPBearer(auto_error=False, description="The token from api.token (KED_API__TOKEN).")


class UnsafeExposure(ConfigError):
    """The API would accept writes from the network without a token."""


def is_loopback(host: str) -> bool:
    """True for loopback addresses and 'localhost'; any other name counts as reachable from outside."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: ApiConfig) -> None:
    """Refuse write endpoints on a non-loopback address without a token (UnsafeExposure says how to fix it)."""
    if not config.enabled or not config.write_enabled or is_loopback(config.host):
        return
    if config.token is None or not config.token.strip():
        raise UnsafeExposure(
            f"api.host is {config.host!r}, which is not a loopback address, and the write endpoints "
            "(POST /v1/facts, POST /v1/revert) are enabled without a token. Set a bearer token "
            "(KED_API__TOKEN), bind to 127.0.0.1 (api.host), or turn the write endpoints off "
            "(api.write_enabled = false)."
        )


def bearer_guard(token: str | None) -> Callable[..., None]:
    """A dependency that requires ``Authorization: Bearer <token>``; allows everything when `token` is None.

    check_exposure guarantees that `token` is None only on a loopback address.
    """

    def guard(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None) -> None:
        given = credentials.credentials if credentials else ""
        if token is None or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                status_code=401,
                detail="this endpoint needs the header 'Authorization: Bearer <api.token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def open_guard() -> None:
        return

    return guard if token is not None else open_guard


def json_problem(body: bytes) -> str | None:
    """Why `body` is not valid JSON, or None. Strict, as ingest reads documents: no NaN, no key twice."""
    try:
        parse_json_document(body)
    except DocumentError as exc:
        return f"body: {exc}"
    return None


async def json_body(request: Request) -> None:
    """The dependency of an endpoint with a JSON body: 415 unless it is application/json, 400 unless valid JSON.

    FastAPI reads an undeclared or other content type as plain bytes and would answer 422 ("Input
    should be a valid dictionary"); and it parses JSON leniently (NaN, a repeated key), which is why
    the body is read again here.
    """
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise HTTPException(status_code=415, detail="send the body as JSON, with the header Content-Type: application/json")
    problem = await run_in_threadpool(json_problem, await request.body())
    if problem is not None:
        raise HTTPException(status_code=400, detail=problem)


async def answer_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 when FastAPI could not parse the body as JSON; otherwise 422 with the errors, long inputs left out."""
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        problem = await run_in_threadpool(json_problem, await request.body())
        return JSONResponse({"detail": problem or "body: invalid JSON"}, status_code=400)
    return JSONResponse({"detail": jsonable_encoder([_quoting_short_input(e) for e in errors])}, status_code=422)


def _quoting_short_input(error: Mapping[str, Any]) -> dict[str, Any]:
    """`error` with its `input` only when that is a short scalar: a 422 must not echo a long prompt back."""
    quoted = {key: value for key, value in error.items() if key != "input"}
    value = error.get("input")
    if "input" in error and _is_short_scalar(value):
        quoted["input"] = value
    return quoted


def _is_short_scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_QUOTED_INPUT_CHARS
    if isinstance(value, float):
        return math.isfinite(value)  # JSON has no NaN or Infinity
    return value is None or isinstance(value, int)


async def send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """Answer with ``{"detail": ...}`` from a middleware."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return None


class BodyLimit:
    """413 for request bodies over `max_bytes`, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send) -> None:
        await send_json(send, 413, f"request body larger than {self.max_bytes} bytes (api.max_request_bytes)")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replay


class TokenBuckets:
    """Per-key token buckets: `rate` tokens a second, at most `burst` saved up. Thread-safe."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, time)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 if allowed, else the seconds until one is available."""
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0 if wait == 0.0 else tokens, now)
            while len(self._buckets) > MAX_TRACKED_CLIENTS:
                self._buckets.popitem(last=False)
        return wait


class RateLimit:
    """429 with Retry-After when a client address exceeds its bucket (probes and /metrics exempt)."""

    def __init__(self, app: ASGIApp, buckets: TokenBuckets) -> None:
        self.app = app
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        wait = self.buckets.take(str(client[0]) if client else "unknown")
        if wait > 0:
            retry = str(max(1, round(wait + 0.5)))
            await send_json(send, 429, "too many requests; slow down (api.rate_limit_per_second)", {"Retry-After": retry})
            return
        await self.app(scope, receive, send)


class RequestMetrics:
    """Count every HTTP request by method, route template and status code, and time it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before answering, the server answers 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.observe_http_request(
                method=_method_label(scope), route=_route_label(scope, status), code=status,
                seconds=time.perf_counter() - started,
            )


def _method_label(scope: Scope) -> str:
    method = str(scope.get("method", ""))
    return method if method in KNOWN_METHODS else "other"


def _route_label(scope: Scope, status: int) -> str:
    """The route template; requests refused before routing are 'limited', unknown paths 'unmatched'."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    return "limited" if status in (413, 429) else "unmatched"
