"""Fixtures for the ingest tests.

- `limits`, `ingest_config`: default configuration (tests override with `model_copy`).
- `ledger`: a real SQLite ledger in tmp_path, migrated to head; yields its session factory.
- `web`: a real HTTP server on 127.0.0.1 serving `Route`s, with conditional GET, redirects and
  deliberate slowness; it records every request's path and headers.
- `DATA`: the fixture folder tests/ingest/data.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ingest.config import IngestConfig, IngestLimits
from store.db import make_engine, make_session_factory, upgrade_to_head
from store.models import Fact, FactOrigin, Rejection

DATA = Path(__file__).parent / "data"


@pytest.fixture
def limits() -> IngestLimits:
    return IngestLimits()


@pytest.fixture
def ingest_config() -> IngestConfig:
    return IngestConfig(settle_seconds=0, jitter_seconds=0)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path}/l.sqlite3")
    upgrade_to_head(engine)
    yield make_session_factory(engine)
    engine.dispose()


def count(factory: sessionmaker[Session], model: type) -> int:
    """Rows in the table of `model`."""
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def counts(factory: sessionmaker[Session]) -> tuple[int, int, int]:
    """(facts, fact origins, rejections) in the ledger."""
    return count(factory, Fact), count(factory, FactOrigin), count(factory, Rejection)


def rejection_reasons(factory: sessionmaker[Session]) -> list[tuple[str | None, str]]:
    """(position, reason) of every rejection, in insertion order."""
    with factory() as session:
        return [(r.position, r.reason) for r in session.scalars(select(Rejection).order_by(Rejection.id))]


@dataclass
class Route:
    """What the test server answers on one path."""

    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    etag: str | None = None
    last_modified: str | None = None
    redirect_to: str | None = None
    delay_seconds: float = 0.0  #: sleep before answering (a hung server)
    trickle_seconds: float = 0.0  #: sleep between body chunks of 64 bytes (a slow sender)
    extra_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class WebServer:
    """A loopback server; set `routes[path] = Route(...)`; `requests` lists (path, headers)."""

    base: str
    routes: dict[str, Route]
    requests: list[tuple[str, dict[str, str]]]
    stop: threading.Event = field(default_factory=threading.Event)  #: set: delayed answers go out now

    def url(self, path: str) -> str:
        return self.base + path


def _answer(route: Route, request_headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) for a request to `route`, honouring conditional GET."""
    if route.redirect_to is not None:
        return (route.status if route.status != 200 else 302), b"", {"Location": route.redirect_to}
    headers = dict(route.extra_headers)
    if route.etag:
        headers["ETag"] = route.etag
    if route.last_modified:
        headers["Last-Modified"] = route.last_modified
    etag_matches = route.etag is not None and request_headers.get("If-None-Match") == route.etag
    date_matches = route.last_modified is not None and request_headers.get("If-Modified-Since") == route.last_modified
    if etag_matches or date_matches:
        return 304, b"", headers
    headers["Content-Type"] = route.content_type
    return route.status, route.body, headers


def _handler(server_state: WebServer, stop: threading.Event) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            del format, args

        def do_GET(self) -> None:
            request_headers = dict(self.headers.items())
            server_state.requests.append((self.path, request_headers))
            route = server_state.routes.get(self.path)
            if route is None:
                self._send(404, b"not found", {})
                return
            if route.delay_seconds:
                stop.wait(route.delay_seconds)
            status, body, headers = _answer(route, request_headers)
            self._send(status, body, headers, trickle=route.trickle_seconds)

        def _send(self, status: int, body: bytes, headers: dict[str, str], trickle: float = 0.0) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if status == 304:
                return
            if not trickle:
                self.wfile.write(body)
                return
            for start in range(0, len(body), 64):
                if stop.is_set():
                    return
                self.wfile.write(body[start : start + 64])
                self.wfile.flush()
                time.sleep(trickle)

    return Handler


@pytest.fixture
def web() -> Iterator[WebServer]:
    state = WebServer(base="", routes={}, requests=[])
    stop = state.stop
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, stop))
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
