"""Ledger writes for ingest: facts with dedup and supersession, rejections, and source poll state.

Every function takes a keyword-only `session` and never commits: the caller owns the transaction,
so "store these records, then move the file away" is one unit. The edit-loop, commit and query
functions live in `store.work`, `store.commits` and `store.queries` and are re-exported here so the
whole ledger API is importable from this module.

Dedup and supersession (docs/ledger.md, "Dedup and conflicts"):
- A record whose normalised (prompt, target_new) matches a fact that is not superseded is a
  duplicate: only a `fact_origins` row is added.
- Otherwise a new pending fact is stored.
- When the record's fact is pending, editing or committed, every *other* pending fact with the same
  normalised prompt is superseded by it: the newest statement about a prompt wins.
- A committed fact with the same prompt and another target stays committed; the new fact links to
  it (`supersedes_id`), and `record_commit` marks it superseded once the new fact is committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import EllipsisType
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session

from store.bulk import insert_rows
from store.commits import current_version, record_commit, record_probe_run, revert_last, revert_to
from store.db import PG_LEDGER_LOCK_KEY
from store.errors import InvalidFact, UnknownSource
from store.models import Base, Fact, FactStatus, Rejection, Source, utc_now
from store.normalise import hash_normalised_pair, hash_normalised_prompt, normalise_text
from store.queries import (
    commit_detail,
    export_facts,
    fact_detail,
    find_facts,
    list_commits,
    list_reverts,
    status_summary,
)
from store.records import AddResult, FactIn, Origin, RejectionIn
from store.states import chunks, transition
from store.work import claim_pending, requeue, reset_stuck_editing

__all__ = [
    "add_facts",
    "add_rejections",
    "claim_pending",
    "commit_detail",
    "current_version",
    "ensure_source",
    "export_facts",
    "fact_detail",
    "find_facts",
    "get_source",
    "list_commits",
    "list_reverts",
    "record_commit",
    "record_probe_run",
    "requeue",
    "reset_stuck_editing",
    "revert_last",
    "revert_to",
    "status_summary",
    "transition",
    "update_source_poll_state",
]

#: Sources first seen in an `Origin` rather than through `ensure_source` get this kind.
ADHOC_SOURCE_KIND = "adhoc"
#: Longest excerpt stored for a rejection; ingest sends about 500 characters.
MAX_EXCERPT_CHARS = 2000
_LIVE = (FactStatus.PENDING, FactStatus.EDITING, FactStatus.COMMITTED)
# Tables for the bulk inserts of add_facts (see store.bulk).
FACTS = Base.metadata.tables["facts"]
FACT_ORIGINS = Base.metadata.tables["fact_origins"]


def ensure_source(*, session: Session, name: str, kind: str, location: str) -> Source:
    """The source called `name`, created if missing; kind and location updated if they changed.

    A changed location resets the poll state (ETag, Last-Modified, cursor), which belonged to the
    old location.
    """
    source = get_source(session=session, name=name)
    if source is None:
        source = Source(name=name, kind=kind, location=location, consecutive_failures=0)
        session.add(source)
        session.flush()
        return source
    if source.location != location:
        source.etag = source.last_modified = source.cursor = None
    source.kind, source.location = kind, location
    return source


def get_source(*, session: Session, name: str) -> Source | None:
    """The source called `name`, or None."""
    return session.scalars(select(Source).where(Source.name == name)).one_or_none()


def update_source_poll_state(
    *,
    session: Session,
    name: str,
    etag: str | EllipsisType | None = ...,
    last_modified: str | EllipsisType | None = ...,
    cursor: str | EllipsisType | None = ...,
    ok: bool,
    error: str | None = None,
) -> None:
    """Record one poll of source `name`. Arguments left at `...` keep their stored value.

    ok=True resets `consecutive_failures` and sets `last_success_at`; ok=False counts a failure and
    stores `error` as `last_error` (kept after later successes, for the record). Raises UnknownSource.
    """
    source = get_source(session=session, name=name)
    if source is None:
        raise UnknownSource(f"no source named {name!r} in the ledger; register it with ensure_source first")
    now = utc_now()
    if not isinstance(etag, EllipsisType):
        source.etag = etag
    if not isinstance(last_modified, EllipsisType):
        source.last_modified = last_modified
    if not isinstance(cursor, EllipsisType):
        source.cursor = cursor
    source.last_polled_at = now
    if ok:
        source.consecutive_failures = 0
        source.last_success_at = now
    else:
        source.consecutive_failures += 1
        source.last_error = error or "poll failed (no error message given)"


def add_rejections(*, session: Session, items: Sequence[RejectionIn]) -> int:
    """Store input records that never became facts. Returns how many rows were written."""
    if not items:
        return 0
    source_ids = _source_ids(session, [item.origin for item in items])
    now = utc_now()
    rows = [
        {
            "source_id": source_ids[item.origin.source],
            "location": item.origin.location,
            "position": item.origin.position,
            "excerpt": item.excerpt[:MAX_EXCERPT_CHARS],
            "reason": item.reason,
            "received_at": now,
        }
        for item in items
    ]
    session.execute(insert(Rejection), rows)
    return len(rows)


@dataclass
class _Plan:
    """add_facts works out the whole batch in memory first; keys < 0 stand for facts not inserted yet."""

    status: dict[int, FactStatus] = field(default_factory=dict)
    hash_of: dict[int, str] = field(default_factory=dict)
    by_hash: dict[str, int] = field(default_factory=dict)  # content hash -> its non-superseded fact
    by_prompt: dict[str, list[int]] = field(default_factory=dict)  # prompt hash -> live facts, oldest first
    new_rows: list[dict[str, Any]] = field(default_factory=list)
    new_supersedes: dict[int, int] = field(default_factory=dict)
    superseded_by: dict[int, int] = field(default_factory=dict)
    keys: list[int] = field(default_factory=list)

    def add_new(self, row: dict[str, Any]) -> int:
        key = -(len(self.new_rows) + 1)
        self.new_rows.append(row)
        self.status[key] = FactStatus.PENDING
        self.hash_of[key] = row["content_hash"]
        self.by_hash[row["content_hash"]] = key
        earlier = self.by_prompt.setdefault(row["prompt_hash"], [])
        if earlier:
            self.new_supersedes[key] = earlier[-1]
        earlier.append(key)
        return key

    def supersede_others(self, key: int, phash: str) -> None:
        kept = []
        for other in self.by_prompt.get(phash, []):
            if other != key and self.status[other] is FactStatus.PENDING:
                self.status[other] = FactStatus.SUPERSEDED
                self.superseded_by[other] = key
                if self.by_hash.get(self.hash_of[other]) == other:
                    del self.by_hash[self.hash_of[other]]
            else:
                kept.append(other)
        self.by_prompt[phash] = kept


def add_facts(*, session: Session, items: Sequence[tuple[FactIn, Origin]]) -> AddResult:
    """Store facts with their provenance, deduplicating and superseding as the module docstring says.

    Raises InvalidFact (naming the origin) for a fact whose prompt or target is empty after
    normalisation or whose `observed_at` is naive; nothing from the batch is written then.
    """
    if not items:
        return AddResult(accepted=0, duplicates=0, superseded=0, fact_ids=())
    now = utc_now()
    rows = [_fact_row(fact, origin) for fact, origin in items]
    if session.get_bind().dialect.name == "postgresql":
        # Serialise adders, as SQLite's immediate transactions do, so dedup sees every earlier batch.
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LEDGER_LOCK_KEY})
    source_ids = _source_ids(session, [origin for _, origin in items])
    for row, (_, origin) in zip(rows, items, strict=True):
        row["source_id"] = source_ids[origin.source]
    plan = _Plan()
    _load_existing(session, plan, rows)
    duplicates = 0
    for row in rows:
        key = plan.by_hash.get(row["content_hash"])
        if key is None:
            key = plan.add_new(row)
        else:
            duplicates += 1
        if plan.status[key] in _LIVE:
            plan.supersede_others(key, row["prompt_hash"])
        plan.keys.append(key)
    ids = _insert_new(session, plan, now)
    _insert_origins(session, plan, rows, ids, now)
    by_newer: dict[int, list[int]] = {}
    for older, newer in plan.superseded_by.items():
        by_newer.setdefault(ids.get(newer, newer), []).append(ids.get(older, older))
    for newer, olders in by_newer.items():
        transition(session=session, fact_ids=olders, to=FactStatus.SUPERSEDED, superseded_by=newer)
    return AddResult(
        accepted=len(plan.new_rows),
        duplicates=duplicates,
        superseded=len(plan.superseded_by),
        fact_ids=tuple(ids.get(key, key) for key in plan.keys),
    )


def _fact_row(fact: FactIn, origin: Origin) -> dict[str, Any]:
    prompt, target = normalise_text(fact.prompt), normalise_text(fact.target_new)
    if not prompt or not target:
        field_name = "prompt" if not prompt else "target_new"
        raise InvalidFact(f"{_where(origin)}: {field_name} is empty after whitespace normalisation")
    if fact.observed_at is not None and fact.observed_at.tzinfo is None:
        raise InvalidFact(f"{_where(origin)}: observed_at {fact.observed_at.isoformat()} has no time zone; give UTC")
    return {
        "prompt": prompt,
        "target_new": target,
        "subject": normalise_text(fact.subject) or None if fact.subject is not None else None,
        "ground_truth": normalise_text(fact.ground_truth) or None if fact.ground_truth is not None else None,
        "rephrase_prompts": [t for t in map(normalise_text, fact.rephrase_prompts) if t],
        "locality": [
            {"prompt": normalise_text(loc.prompt), "answer": normalise_text(loc.answer)} for loc in fact.locality
        ],
        "content_hash": hash_normalised_pair(prompt, target),
        "prompt_hash": hash_normalised_prompt(prompt),
        "external_id": fact.external_id,
        "observed_at": fact.observed_at,
        "origin_location": origin.location,
        "origin_position": origin.position,
    }


def _where(origin: Origin) -> str:
    return f"{origin.source}: {origin.location}" + (f" {origin.position}" if origin.position else "")


def _source_ids(session: Session, origins: Iterable[Origin]) -> dict[str, int]:
    wanted: dict[str, str] = {}
    for origin in origins:
        wanted.setdefault(origin.source, origin.location)
    query = select(Source.name, Source.id).where(Source.name.in_(list(wanted)))
    found: dict[str, int] = {name: source_id for name, source_id in session.execute(query)}
    for name, location in wanted.items():
        if name not in found:
            found[name] = ensure_source(session=session, name=name, kind=ADHOC_SOURCE_KIND, location=location).id
    return found


def _load_existing(session: Session, plan: _Plan, rows: list[dict[str, Any]]) -> None:
    # Equal content implies an equal prompt, so one lookup by prompt hash finds both the facts a
    # record may duplicate and the pending facts it may supersede.
    prompts = list({row["prompt_hash"] for row in rows})
    found: list[tuple[int, str, str, FactStatus]] = []
    columns = (Fact.id, Fact.content_hash, Fact.prompt_hash, Fact.status)
    for part in chunks(prompts):
        query = select(*columns).where(Fact.prompt_hash.in_(part), Fact.status != FactStatus.SUPERSEDED)
        found.extend((fid, chash, phash, status) for fid, chash, phash, status in session.execute(query))
    for fid, chash, phash, status in sorted(found):
        plan.status[fid], plan.hash_of[fid] = status, chash
        current = plan.by_hash.get(chash)
        # Several non-superseded facts can share a hash after a revert; prefer a live one, then the newest.
        if current is None or status in _LIVE or plan.status[current] not in _LIVE:
            plan.by_hash[chash] = fid
        if status in _LIVE:
            plan.by_prompt.setdefault(phash, []).append(fid)


def _allocate_ids(session: Session, count: int) -> list[int]:
    """Ids for `count` new facts, so they can be inserted without RETURNING (several times faster)."""
    if session.get_bind().dialect.name == "postgresql":
        query = text("SELECT nextval(pg_get_serial_sequence('facts', 'id')) FROM generate_series(1, :n)")
        return [int(fid) for fid in session.scalars(query, {"n": count})]
    # SQLite: the immediate transaction holds the write lock, so nobody else can take these ids.
    start = (session.scalar(select(func.max(Fact.id))) or 0) + 1
    return list(range(start, start + count))


def _insert_new(session: Session, plan: _Plan, now: datetime) -> dict[int, int]:
    """Insert the planned new facts; returns placeholder key -> real id."""
    if not plan.new_rows:
        return {}
    new_ids = _allocate_ids(session, len(plan.new_rows))
    ids = {-(index + 1): fid for index, fid in enumerate(new_ids)}
    for index, row in enumerate(plan.new_rows):
        earlier = plan.new_supersedes.get(-(index + 1))
        row["id"] = new_ids[index]
        row["supersedes_id"] = ids.get(earlier, earlier) if earlier is not None else None
    shared = {"status": FactStatus.PENDING, "attempts": 0, "received_at": now, "status_changed_at": now}
    insert_rows(session, FACTS, plan.new_rows, shared)
    return ids


def _insert_origins(
    session: Session, plan: _Plan, rows: list[dict[str, Any]], ids: dict[int, int], now: datetime
) -> None:
    origin_rows = [
        {
            "fact_id": ids.get(key, key),
            "source_id": row["source_id"],
            "location": row["origin_location"],
            "position": row["origin_position"],
            "external_id": row["external_id"],
            "observed_at": row["observed_at"],
        }
        for key, row in zip(plan.keys, rows, strict=True)
    ]
    insert_rows(session, FACT_ORIGINS, origin_rows, {"received_at": now})
