"""What guards the OpenAI routes beyond the API's own limits: the read token, and OpenAI's error shape.

- `ReadToken`: with `api.read_token` set, 401 on the guarded paths (the OpenAI routes and POST /v1/query)
  unless the request carries ``Authorization: Bearer <read token or write token>``.
- `OpenAIErrorShape`: on the OpenAI paths, an error answered in the daemon's shape (``{"detail": ...}``,
  as the body-size and rate limits, the read token and FastAPI answer) is rewritten into OpenAI's
  ``{"error": {"message", "type", "param", "code"}}`` with the same status. Other paths are untouched,
  and so is every answer below 400 (streams pass through unbuffered).

Both are plain ASGI middlewares, like those of `daemon.api_guards`.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.api_guards import send_json
from daemon.openai_models import OpenAIError


class ReadToken:
    """401 on `paths` unless the bearer token is one of `tokens`."""

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...], paths: frozenset[str]) -> None:
        self.app = app
        self.tokens = tuple(token.encode() for token in tokens)
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in self.paths and not self._allowed(scope):
            await send_json(
                send, 401, "this endpoint needs the header 'Authorization: Bearer <api.read_token>' (or the write token)",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        matches = [hmac.compare_digest(given.strip().encode(), token) for token in self.tokens]  # all compared: no timing hint
        return any(matches)


class OpenAIErrorShape:
    """On `paths`, error answers in the daemon's ``{"detail": ...}`` shape become OpenAI-shaped."""

    def __init__(self, app: ASGIApp, paths: frozenset[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def reshape(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and int(message["status"]) >= 400:
                start = message  # held until the whole error body is known
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            reshaped = openai_error_body(int(start["status"]), bytes(body))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(reshaped)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": reshaped})

        await self.app(scope, receive, reshape)


def openai_error_body(status: int, body: bytes) -> bytes:
    """`body` of an error answer in OpenAI's shape: unchanged if it already is, else its message re-wrapped."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = body.decode("utf-8", "replace").strip()
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return body
    detail = data.get("detail", data) if isinstance(data, dict) else data
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):  # FastAPI's validation errors
        detail = str(detail[0].get("msg", detail[0]))
    return json.dumps(OpenAIError(status, str(detail) or f"HTTP {status}").body()).encode()
