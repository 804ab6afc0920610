"""Logging: JSON lines off a terminal, readable lines on one, third-party loggers in the same stream."""

from __future__ import annotations

import io
import json
import logging

import structlog

from daemon.config import LoggingConfig
from daemon.logs import configure_logging


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig(), stream=stream)
    structlog.get_logger("daemon.test").info("ready", model="x", seconds=1.5)
    logging.getLogger("sqlalchemy.engine").warning("pool exhausted %d", 3)
    logging.getLogger("apscheduler.scheduler").info("below library level, dropped")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "ready" and lines[0]["model"] == "x" and lines[0]["level"] == "info"
    assert "timestamp" in lines[0]
    assert lines[1]["event"] == "pool exhausted 3" and lines[1]["logger"] == "sqlalchemy.engine"
    assert len(lines) == 2


def test_readable_lines_on_a_terminal() -> None:
    stream = FakeTty()
    configure_logging(LoggingConfig(), stream=stream)
    structlog.get_logger("daemon.test").info("ready", model="x")
    text = stream.getvalue()
    assert "ready" in text and "model" in text
    assert not text.lstrip().startswith("{")


def test_transformers_logs_join_the_stream() -> None:
    from transformers.utils import logging as hf_logging

    stream = io.StringIO()
    configure_logging(LoggingConfig(library_level="INFO"), stream=stream)
    hf_logging.get_logger("transformers.test").warning("from transformers")
    record = json.loads(stream.getvalue().splitlines()[-1])
    assert record["event"] == "from transformers"
    assert record["logger"] == "transformers.test"
