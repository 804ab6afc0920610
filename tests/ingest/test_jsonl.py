"""JSONL sources read incrementally: local files (offset) and URLs (conditional GET plus offset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from ingest import jsonl
from ingest.config import IngestConfig, JsonlSource
from ingest.errors import FetchError
from tests.ingest.conftest import Route, WebServer, counts, rejection_reasons


def line(i: int) -> str:
    return json.dumps({"prompt": f"The mayor of town {i} is", "target_new": f"Mayor {i}"}) + "\n"


def test_local_file_is_read_from_the_remembered_offset(
    tmp_path: Path, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    path = tmp_path / "stream.jsonl"
    path.write_text(line(1) + line(2) + '{"prompt": "half a li')
    source = JsonlSource(name="stream", location=str(path))
    assert jsonl.poll(source, ingest_config, ledger).tally.accepted == 2
    with path.open("a") as handle:  # the writer finishes the line and adds a bad one and a good one
        handle.write('ne is", "target_new": "done"}\n' + "{oops\n" + line(3))
    second = jsonl.poll(source, ingest_config, ledger)
    assert (second.tally.accepted, second.tally.rejected, second.tally.duplicates) == (2, 1, 0)
    assert rejection_reasons(ledger) == [("line 4", "record: invalid JSON: Expecting property name enclosed in "
                                                     "double quotes at column 2")]
    assert jsonl.poll(source, ingest_config, ledger).tally.accepted == 0
    assert counts(ledger) == (4, 4, 1)


def test_replaced_file_is_read_from_the_start(
    tmp_path: Path, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    path = tmp_path / "stream.jsonl"
    path.write_text(line(1) + line(2))
    source = JsonlSource(name="stream", location=str(path))
    jsonl.poll(source, ingest_config, ledger)
    path.write_text(line(9) + line(1) + line(2) + line(3))  # rotated: new content, longer than before
    result = jsonl.poll(source, ingest_config, ledger)
    assert (result.tally.accepted, result.tally.duplicates) == (2, 2)


def test_facts_per_poll_limit(tmp_path: Path, ledger: sessionmaker[Session]) -> None:
    config = IngestConfig(limits={"max_facts_per_poll": 2})  # type: ignore[arg-type]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(line(i) for i in range(5)))
    source = JsonlSource(name="s", location=str(path))
    assert [jsonl.poll(source, config, ledger).tally.accepted for _ in range(4)] == [2, 2, 1, 0]


def test_overlong_unterminated_line_is_rejected_and_skipped(tmp_path: Path, ledger: sessionmaker[Session]) -> None:
    config = IngestConfig(limits={"max_line_bytes": 256, "max_fetch_bytes": 1024})  # type: ignore[arg-type]
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"x" * 2000 + b"\n" + line(1).encode())
    source = JsonlSource(name="s", location=str(path))
    polls = [jsonl.poll(source, config, ledger).tally for _ in range(3)]
    assert [(t.accepted, t.rejected) for t in polls] == [(0, 1), (0, 1), (1, 0)]
    assert rejection_reasons(ledger)[0] == (
        "line 1", "record: line is 1024 bytes, longer than the limit of 256 (ingest.limits.max_line_bytes)")


def test_missing_local_file_raises_fetch_error(tmp_path: Path, ingest_config: IngestConfig,
                                               ledger: sessionmaker[Session]) -> None:
    source = JsonlSource(name="gone", location=str(tmp_path / "missing.jsonl"))
    with pytest.raises(FetchError, match=r"missing\.jsonl: cannot read"):
        jsonl.poll(source, ingest_config, ledger)


def test_url_is_read_incrementally_with_conditional_get(
    web: WebServer, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    web.routes["/s.jsonl"] = Route((line(1) + line(2)).encode(), etag='"1"')
    source = JsonlSource(name="remote", location=web.url("/s.jsonl"))
    assert jsonl.poll(source, ingest_config, ledger).tally.accepted == 2
    assert jsonl.poll(source, ingest_config, ledger).not_modified
    web.routes["/s.jsonl"] = Route((line(1) + line(2) + line(3)).encode(), etag='"2"')
    grown = jsonl.poll(source, ingest_config, ledger)
    assert (grown.tally.accepted, grown.tally.duplicates) == (1, 0)  # only the new line was read
    assert counts(ledger) == (3, 3, 0)
