"""Logging set-up: structlog for our events, with the stdlib loggers of our dependencies in the same stream.

`configure_logging` is called once, by an entry point (through `daemon.bootstrap`). Modules get
loggers with `structlog.get_logger(__name__)` (or `logging.getLogger(__name__)` for library-style
code); both end up as one JSON object per line when the stream is not a terminal, readable lines
otherwise. Logging to standard output or standard error means the process's stream as it is when a
line is written, so a command run in-process (by a test that captures its output) leaves no handler
on a stream that has since been closed.
"""

from __future__ import annotations

import logging
import logging.config
import sys
from typing import IO, Any

import structlog

from daemon.config import LoggingConfig

# Third-party loggers we route into our stream, at `library_level`.
LIBRARY_LOGGERS = ("transformers", "sqlalchemy", "alembic", "apscheduler", "uvicorn", "httpx", "filelock", "accelerate")


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]


class _StandardStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on `sys.stdout` or `sys.stderr` as they are at each record, not as they were at set-up."""

    def __init__(self, name: str) -> None:
        self._stream_name = name
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return getattr(sys, self._stream_name)  # type: ignore[no-any-return]

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass  # always the standard stream of its name


def _handler(stream: IO[str]) -> logging.Handler:
    for name in ("stdout", "stderr"):
        if stream is getattr(sys, name):
            return _StandardStreamHandler(name)
    return logging.StreamHandler(stream)


def configure_logging(config: LoggingConfig, stream: IO[str] | None = None) -> None:
    """Configure structlog and the stdlib root logger to write to `stream` (default: stdout)."""
    stream = stream or sys.stdout
    use_json = config.format == "json" or (config.format == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = _handler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level)
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.setLevel(config.library_level)
        lib.handlers.clear()
        lib.propagate = True
    structlog.configure(
        processors=[
            *_shared_processors()[:-1],
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    if "transformers" in sys.modules:
        route_transformers_logging(config.library_level)


def route_transformers_logging(level: str | None = None) -> None:
    """Make transformers log through the stdlib root logger (its default is a private stderr handler).

    Called by `configure_logging` when transformers is already imported, and by the model loader
    right after it imports transformers, so command-line tools that never load a model do not pay
    for importing it.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if level is not None:
        hf_logging.set_verbosity(logging.getLevelName(level))
