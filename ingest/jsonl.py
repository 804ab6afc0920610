"""JSONL sources (a local path or a URL) read incrementally.

The cursor remembers the byte offset after the last line taken, the next line number and a hash
of the bytes before the offset. A local file is read from the offset (at most `max_fetch_bytes`
per poll, complete lines only: a line still being written waits for its newline). A URL is
fetched with conditional GET; a changed body whose start still matches the hash is read from
the offset, anything else (the file was replaced or truncated) from the start again, and the
ledger's dedup absorbs facts seen before. At most `max_facts_per_poll` records are taken per poll.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from ingest.config import IngestConfig, JsonlSource
from ingest.documents import jsonl_records
from ingest.errors import DocumentError, FetchError
from ingest.facts import to_outcomes
from ingest.polling import Poll, SourceState, commit_poll, conditional_fetch, ledger_name, open_source, unchanged_poll
from ingest.trust import polled_rules

KIND = "jsonl"
PREFIX_BYTES = 65536


def _prefix_hash(data: bytes, offset: int) -> str:
    return hashlib.sha256(data[: min(offset, PREFIX_BYTES)]).hexdigest()


def take_lines(data: bytes, max_records: int, *, complete_only: bool) -> bytes:
    """The prefix of `data` holding at most `max_records` non-blank lines, ending at a line end.

    With `complete_only`, a last line without its newline is left out (it may still be written).
    """
    end = data.rfind(b"\n") + 1 if complete_only else len(data)
    taken, pos = 0, 0
    while pos < end and taken < max_records:
        newline = data.find(b"\n", pos, end)
        stop = end if newline < 0 else newline + 1
        if data[pos:stop].strip():
            taken += 1
        pos = stop
    return data[:pos]


def _read_path(path: Path, cursor: dict[str, Any], max_bytes: int) -> tuple[bytes, int, int]:
    """(new bytes, their offset, their first line number); from the start if the file was replaced."""
    try:
        with path.open("rb") as handle:
            head = handle.read(PREFIX_BYTES)
            offset, line = int(cursor.get("offset", 0)), int(cursor.get("line", 1))
            size = path.stat().st_size
            if offset > size or (offset > 0 and _prefix_hash(head, offset) != cursor.get("prefix")):
                offset, line = 0, 1  # truncated, rotated or replaced
            handle.seek(offset)
            return handle.read(max_bytes), offset, line
    except OSError as exc:
        raise FetchError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _chunk(data: bytes, start: int, config: IngestConfig, *, complete_only: bool) -> bytes:
    """The part of `data` taken this poll; an overlong line without newline is taken whole (and rejected)."""
    chunk = take_lines(data[start:], config.limits.max_facts_per_poll, complete_only=complete_only)
    rest = data[start:]
    if not chunk and complete_only and len(rest) >= config.limits.max_line_bytes:
        return rest  # no newline within the limit: this is one overlong line, reject it and move on
    return chunk


def poll(source: JsonlSource, config: IngestConfig, session_factory: sessionmaker[Session]) -> Poll:
    """Read the new lines of one JSONL source into the ledger. Raises FetchError when unreadable."""
    state = open_source(session_factory, name=ledger_name(KIND, source.name), kind=KIND, location=source.location)
    if source.is_url():
        return _poll_url(source, config, session_factory, state)
    path = Path(source.location)
    data, offset, line = _read_path(path, state.cursor, config.limits.max_fetch_bytes)
    chunk = _chunk(data, 0, config, complete_only=True)
    if not chunk:
        return commit_poll(session_factory, state, [], cursor=None)
    with path.open("rb") as handle:
        head = handle.read(min(offset + len(chunk), PREFIX_BYTES))
    return _record(source, config, session_factory, state, chunk, offset, line, head, validators=None)


def _record(
    source: JsonlSource,
    config: IngestConfig,
    factory: sessionmaker[Session],
    state: SourceState,
    chunk: bytes,
    offset: int,
    line: int,
    head: bytes,
    *,
    validators: tuple[str | None, str | None] | None,
) -> Poll:
    records = jsonl_records(chunk, config.limits, first_line=line)
    outcomes = to_outcomes(records, source=state.name, location=source.location, limits=config.limits)
    end = offset + len(chunk)
    cursor = {"offset": end, "line": line + chunk.count(b"\n"), "prefix": _prefix_hash(head, end)}
    return commit_poll(factory, state, outcomes, cursor=cursor, validators=validators, rules=polled_rules(config, state.name, source, fetched=source.is_url()))


def _poll_url(source: JsonlSource, config: IngestConfig, factory: sessionmaker[Session], state: SourceState) -> Poll:
    if urlsplit(source.location).path.endswith(".gz"):
        raise DocumentError(f"{source.location}: gzip JSONL URLs are not read incrementally; serve plain JSONL")
    response = conditional_fetch(source.location, config, state)
    if response.not_modified:
        return unchanged_poll(factory, state)
    body = response.body
    offset, line = int(state.cursor.get("offset", 0)), int(state.cursor.get("line", 1))
    if offset > len(body) or _prefix_hash(body, offset) != state.cursor.get("prefix", _prefix_hash(body, 0)):
        offset, line = 0, 1
    chunk = _chunk(body, offset, config, complete_only=False)
    finished = offset + len(chunk) >= len(body)
    # Validators are stored only once the body is fully read, so a partial read is fetched again.
    validators = (response.etag, response.last_modified) if finished else (None, None)
    if not chunk:
        return commit_poll(factory, state, [], cursor=None, validators=validators)
    return _record(source, config, factory, state, chunk, offset, line, body, validators=validators)
