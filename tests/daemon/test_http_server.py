"""`daemon.http_server`: real sockets on loopback; start reports the port, stop is clean and bounded."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from daemon.config import ApiConfig
from daemon.http_server import HttpServer, HttpServerError


async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers /slow after 60 s, anything else at once."""
    assert scope["type"] == "http"
    if scope["path"] == "/slow":
        await asyncio.sleep(60)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def config(**fields: Any) -> ApiConfig:
    return ApiConfig.model_validate({"port": 0, **fields})


def test_port_zero_reports_the_real_port_and_stop_closes_it() -> None:
    server = HttpServer(slow_app, config())
    server.start()
    try:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{server.url}/", timeout=5).text == "ok"
        with pytest.raises(HttpServerError, match="started already"):
            server.start()
    finally:
        started = time.monotonic()
        assert server.stop()
    assert time.monotonic() - started < 5
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/", timeout=2)
    assert server.stop()  # a second stop is harmless


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HttpServer(slow_app, config(port=port))
        with pytest.raises(HttpServerError, match=f"127.0.0.1:{port}"):
            server.start()


def test_stop_is_bounded_even_with_a_request_in_flight() -> None:
    server = HttpServer(slow_app, config(shutdown_timeout_seconds=1))
    server.start()
    outcome: list[str] = []

    def slow_request() -> None:
        try:
            outcome.append(str(httpx.get(f"{server.url}/slow", timeout=30).status_code))
        except httpx.HTTPError as exc:
            outcome.append(type(exc).__name__)

    client = threading.Thread(target=slow_request)
    client.start()
    time.sleep(0.5)  # the request is in flight
    started = time.monotonic()
    assert server.stop()
    elapsed = time.monotonic() - started
    client.join(10)
    assert elapsed < 1 + 2 * 3.0 + 1, elapsed
    # The hung request was cut off (uvicorn answers 500 or drops the connection), not awaited for 60 s.
    assert outcome and outcome != ["200"], outcome


def test_context_manager_serves_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 support in Python's socket module")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback address on this machine")
    with HttpServer(slow_app, config(host="::1")) as server:
        assert server.url == f"http://[::1]:{server.port}"
        assert httpx.get(f"{server.url}/", timeout=5).text == "ok"
