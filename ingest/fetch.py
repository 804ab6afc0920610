"""Our HTTP client for feeds, web JSON and JSONL URLs: timeouts, conditional GET, size limit, redirects.

`fetch` sends `If-None-Match` / `If-Modified-Since` when given the stored validators and returns a
`Response` (status 304 means "not modified", with an empty body). Every failure is a `FetchError`
whose message names the URL and the problem: connection refused, timeout (connect, read, or the
total time of the transfer), an HTTP error status, a body over `max_bytes` (counted after any
Content-Encoding is undone, so compressed bombs are cut off too), or a redirect to another host.
Proxies and other settings from the environment are ignored (`trust_env=False`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from ingest.config import HttpConfig
from ingest.errors import FetchError

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Response:
    """A completed fetch: the final URL, status 200 or 304, body and the validators to store."""

    url: str
    status: int
    body: bytes
    etag: str | None
    last_modified: str | None
    content_type: str | None

    @property
    def not_modified(self) -> bool:
        """True for 304: the stored validators still match, nothing new to read."""
        return self.status == 304


def _same_host(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.hostname or "").lower() == (pb.hostname or "").lower() and pa.port == pb.port


def _next_url(url: str, response: httpx.Response, origin: str) -> str:
    location: str | None = response.headers.get("location")
    if not location:
        raise FetchError(f"{url}: HTTP {response.status_code} redirect without a Location header")
    target = urljoin(url, location)
    if urlsplit(target).scheme not in ("http", "https"):
        raise FetchError(f"{url}: redirect to {target!r} refused: only http(s) is followed")
    if not _same_host(origin, target):
        raise FetchError(f"{url}: redirect to another host ({target}) refused; configure that URL directly if it is trusted")
    return target


def _read_body(url: str, response: httpx.Response, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"{url}: response is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise FetchError(f"{url}: response is larger than the limit of {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise FetchError(f"{url}: transfer took longer than the total timeout; cut off")
    return bytes(body)


def _request_headers(config: HttpConfig, etag: str | None, last_modified: str | None) -> dict[str, str]:
    headers = {"User-Agent": config.user_agent, "Accept": "*/*"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    return headers


def fetch(
    url: str,
    config: HttpConfig,
    *,
    max_bytes: int,
    etag: str | None = None,
    last_modified: str | None = None,
) -> Response:
    """GET `url` under `config`'s rules. Returns status 200 (with body) or 304; raises FetchError."""
    timeout = httpx.Timeout(
        connect=config.connect_timeout_seconds,
        read=config.read_timeout_seconds,
        write=config.read_timeout_seconds,
        pool=config.connect_timeout_seconds,
    )
    deadline = time.monotonic() + config.total_timeout_seconds
    headers = _request_headers(config, etag, last_modified)
    current = url
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            for _ in range(config.max_redirects + 1):
                with client.stream("GET", current, headers=headers) as response:
                    if response.status_code in REDIRECT_STATUSES:
                        current = _next_url(current, response, url)
                        continue
                    return _complete(current, response, max_bytes, deadline)
    except httpx.TimeoutException as exc:
        raise FetchError(f"{current}: timed out ({type(exc).__name__})") from None
    except httpx.InvalidURL as exc:
        raise FetchError(f"{current}: invalid URL ({exc})") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"{current}: {type(exc).__name__}: {exc}") from None
    raise FetchError(f"{url}: more than {config.max_redirects} redirects (ingest.http.max_redirects)")


def _complete(url: str, response: httpx.Response, max_bytes: int, deadline: float) -> Response:
    if response.status_code == 304:
        body = b""
    elif response.status_code == 200:
        body = _read_body(url, response, max_bytes, deadline)
    else:
        raise FetchError(f"{url}: HTTP {response.status_code} {response.reason_phrase}".rstrip())
    return Response(
        url=url,
        status=response.status_code,
        body=body,
        etag=response.headers.get("etag"),
        last_modified=response.headers.get("last-modified"),
        content_type=response.headers.get("content-type"),
    )
