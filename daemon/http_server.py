"""Serving an ASGI app with uvicorn in a background thread, with a bounded start and stop.

`HttpServer.start()` binds the socket itself (so "address in use" is raised to the caller at once,
and port 0 yields the real port in `port`), runs uvicorn's event loop in a daemon thread and waits
until it accepts connections. `stop()` asks uvicorn to finish in-flight requests within
`api.shutdown_timeout_seconds`, then forces it; it never waits longer than that plus a few seconds.
Uvicorn installs no signal handlers outside the main thread, so the service keeps its own.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import structlog
import uvicorn
from starlette.types import ASGIApp

from daemon.config import ApiConfig

log = structlog.get_logger(__name__)

#: Extra seconds a stop waits beyond the graceful timeout, and after forcing, before giving up.
STOP_GRACE_SECONDS = 3.0


class HttpServerError(RuntimeError):
    """The server could not bind or start; the message names the address and the cause."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to (host, port); HttpServerError when that is impossible."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise HttpServerError(f"cannot resolve api.host {host!r}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise HttpServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another api.port") from None
    return sock


class HttpServer:
    """One uvicorn server in a background thread. Use `with HttpServer(app, config) as server:` or start/stop."""

    def __init__(self, app: ASGIApp, config: ApiConfig) -> None:
        self.config = config
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_config=None,  # the daemon's logging set-up handles uvicorn's loggers
                access_log=False,  # requests are counted in ked_http_requests_total instead
                lifespan="off",
                server_header=False,
                limit_concurrency=config.max_concurrent_requests,
                timeout_graceful_shutdown=max(1, round(config.shutdown_timeout_seconds)),
            )
        )
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. http://127.0.0.1:8470."""
        host = self.config.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Bind and serve; returns once connections are accepted. HttpServerError if it does not start in time."""
        if self._thread is not None:
            raise HttpServerError("the server was started already")
        self._socket = bind_socket(self.config.host, self.config.port)
        self.port = int(self._socket.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, name="ked-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                cause = f": {self._error!r}" if self._error else ""
                raise HttpServerError(f"HTTP server on {self.config.host}:{self.port} did not start{cause}")
            time.sleep(0.01)
        log.info("http api listening", url=self.url)

    def _serve(self) -> None:
        assert self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # reported by start()/stop(); a thread has no one else to tell
            self._error = exc
            log.error("http server failed", error=repr(exc))

    def stop(self) -> bool:
        """Stop serving; True when the server thread has ended (bounded: graceful, then forced)."""
        thread = self._thread
        if thread is None:
            return True
        self._server.should_exit = True
        thread.join(self.config.shutdown_timeout_seconds + STOP_GRACE_SECONDS)
        if thread.is_alive():
            log.warning("http server did not stop in time; forcing", seconds=self.config.shutdown_timeout_seconds)
            self._server.force_exit = True
            thread.join(STOP_GRACE_SECONDS)
        if self._socket is not None:
            self._socket.close()
        stopped = not thread.is_alive()
        if stopped:
            log.info("http api stopped", url=self.url)
        else:
            log.error("http server thread still running after stop; abandoning it (daemon thread)")
        return stopped

    def __enter__(self) -> HttpServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
