"""The HTTP client against a real loopback server: conditional GET, limits, timeouts, redirects."""

from __future__ import annotations

import gzip
import time

import pytest

from ingest.config import HttpConfig
from ingest.errors import FetchError
from ingest.fetch import fetch
from tests.ingest.conftest import Route, WebServer

FAST = HttpConfig(connect_timeout_seconds=1, read_timeout_seconds=0.5, total_timeout_seconds=2)


def test_fetch_returns_body_and_validators(web: WebServer) -> None:
    web.routes["/a"] = Route(b"hello", etag='"v1"', last_modified="Sat, 21 Nov 2026 10:00:00 GMT")
    response = fetch(web.url("/a"), FAST, max_bytes=100)
    assert (response.status, response.body, response.etag) == (200, b"hello", '"v1"')
    assert response.last_modified == "Sat, 21 Nov 2026 10:00:00 GMT"
    assert web.requests[-1][1]["User-Agent"] == FAST.user_agent


def test_conditional_get_with_etag_and_if_modified_since(web: WebServer) -> None:
    web.routes["/a"] = Route(b"hello", etag='"v1"')
    assert fetch(web.url("/a"), FAST, max_bytes=100, etag='"v1"').not_modified
    assert web.requests[-1][1]["If-None-Match"] == '"v1"'
    web.routes["/b"] = Route(b"x", last_modified="Sat, 21 Nov 2026 10:00:00 GMT")
    second = fetch(web.url("/b"), FAST, max_bytes=100, last_modified="Sat, 21 Nov 2026 10:00:00 GMT")
    assert second.not_modified and second.body == b""
    assert web.requests[-1][1]["If-Modified-Since"] == "Sat, 21 Nov 2026 10:00:00 GMT"


def test_body_over_the_limit_is_refused(web: WebServer) -> None:
    web.routes["/big"] = Route(b"x" * 5000)
    with pytest.raises(FetchError, match="5000 bytes; the limit is 1000"):
        fetch(web.url("/big"), FAST, max_bytes=1000)


def test_body_without_length_over_the_limit_is_cut_off(web: WebServer) -> None:
    # Content-Length lies (claims small): the streamed count still stops it.
    web.routes["/gz"] = Route(
        gzip.compress(b"a" * 200_000), extra_headers={"Content-Encoding": "gzip"}
    )
    with pytest.raises(FetchError, match="larger than the limit of 1000 bytes"):
        fetch(web.url("/gz"), FAST, max_bytes=1000)


def test_http_error_status_names_url_and_status(web: WebServer) -> None:
    with pytest.raises(FetchError, match=r"/missing: HTTP 404"):
        fetch(web.url("/missing"), FAST, max_bytes=100)


def test_hung_server_times_out(web: WebServer) -> None:
    web.routes["/hang"] = Route(b"late", delay_seconds=3)
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch(web.url("/hang"), FAST, max_bytes=100)
    assert time.monotonic() - started < 2.5


def test_slow_sender_is_cut_off_by_total_timeout(web: WebServer) -> None:
    web.routes["/slow"] = Route(b"y" * 64 * 40, trickle_seconds=0.1)
    config = HttpConfig(connect_timeout_seconds=1, read_timeout_seconds=1, total_timeout_seconds=1)
    with pytest.raises(FetchError, match="total timeout"):
        fetch(web.url("/slow"), config, max_bytes=10_000)


def test_redirect_on_same_host_is_followed(web: WebServer) -> None:
    web.routes["/old"] = Route(redirect_to="/new", status=301)
    web.routes["/new"] = Route(b"moved")
    response = fetch(web.url("/old"), FAST, max_bytes=100)
    assert response.body == b"moved" and response.url.endswith("/new")


def test_redirect_to_another_host_is_refused(web: WebServer) -> None:
    web.routes["/away"] = Route(redirect_to="http://example.invalid/facts.json")
    with pytest.raises(FetchError, match="redirect to another host"):
        fetch(web.url("/away"), FAST, max_bytes=100)
    assert not any(path == "/facts.json" for path, _ in web.requests)


def test_redirect_to_file_scheme_is_refused(web: WebServer) -> None:
    web.routes["/file"] = Route(redirect_to="file:///etc/passwd")
    with pytest.raises(FetchError, match="only http"):
        fetch(web.url("/file"), FAST, max_bytes=100)


def test_redirect_loop_stops_at_the_limit(web: WebServer) -> None:
    web.routes["/loop"] = Route(redirect_to="/loop")
    with pytest.raises(FetchError, match="more than 3 redirects"):
        fetch(web.url("/loop"), FAST, max_bytes=100)
    assert len(web.requests) == 4


def test_connection_refused_is_a_fetch_error() -> None:
    with pytest.raises(FetchError, match=r"127\.0\.0\.1:9"):
        fetch("http://127.0.0.1:9/x", FAST, max_bytes=100)
