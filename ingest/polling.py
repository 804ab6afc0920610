"""What every polled source shares: its stored state, and committing a poll as one transaction.

A poll reads the source's state (`SourceState`), fetches and parses, then calls `commit_poll`,
which stores the outcomes, the new cursor and the HTTP validators, and the poll's success or
failure, all in one transaction. Each source module (`jsonl`, `rss`, `web`) exposes the same
function shape: `poll(source, config, session_factory) -> Poll`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ingest.config import IngestConfig
from ingest.facts import Outcome
from ingest.fetch import Response, fetch
from ingest.progress import dump_cursor, load_cursor
from ingest.recording import Tally, record_outcomes
from store import intake
from store.trust import TrustRules


@dataclass(frozen=True)
class SourceState:
    """A source's stored poll state, read at the start of a poll."""

    name: str  #: ledger name, '<kind>:<configured name>'
    cursor: dict[str, Any]
    etag: str | None
    last_modified: str | None


@dataclass
class Poll:
    """The result of one poll: what was recorded, and the failure if the poll did not succeed."""

    tally: Tally = field(default_factory=Tally)
    failure: str | None = None  #: e.g. "feed: malformed XML ..."; None for a successful poll
    not_modified: bool = False  #: the server answered 304; nothing was read


def ledger_name(kind: str, name: str) -> str:
    """The name a configured source has in the ledger (`Origin.source`)."""
    return f"{kind}:{name}"


def open_source(factory: sessionmaker[Session], *, name: str, kind: str, location: str) -> SourceState:
    """Register the source if needed and return its stored state."""
    with factory.begin() as session:
        row = intake.ensure_source(session=session, name=name, kind=kind, location=location)
        state = SourceState(name, load_cursor(session, name), row.etag, row.last_modified)
    return state


def conditional_fetch(url: str, config: IngestConfig, state: SourceState) -> Response:
    """Fetch `url` with the configured HTTP settings and size limit, sending the state's validators.

    Raises FetchError as `fetch` does; a 304 answer comes back as a Response with `not_modified`.
    """
    return fetch(
        url, config.http, max_bytes=config.limits.max_fetch_bytes, etag=state.etag, last_modified=state.last_modified
    )


def unchanged_poll(factory: sessionmaker[Session], state: SourceState) -> Poll:
    """Record a poll the server answered with 304: nothing read, cursor and validators kept, poll ok."""
    result = commit_poll(factory, state, [], cursor=None)
    result.not_modified = True
    return result


def commit_poll(
    factory: sessionmaker[Session],
    state: SourceState,
    outcomes: Sequence[Outcome],
    *,
    cursor: dict[str, Any] | None,
    validators: tuple[str | None, str | None] | None = None,
    failure: str | None = None,
    rules: TrustRules | None = None,
) -> Poll:
    """Store `outcomes` under the trust `rules`, the new `cursor` (None: unchanged), the (ETag,
    Last-Modified) `validators` (None: unchanged) and the poll's outcome in one transaction."""
    extra: dict[str, Any] = {}
    if cursor is not None:
        extra["cursor"] = dump_cursor(cursor)
    if validators is not None:
        extra["etag"], extra["last_modified"] = validators
    with factory.begin() as session:
        tally = record_outcomes(session, outcomes, rules)
        intake.update_source_poll_state(session=session, name=state.name, ok=failure is None, error=failure, **extra)
    return Poll(tally=tally, failure=failure)
