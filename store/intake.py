"""Ledger writes for ingest: facts with dedup and supersession, rejections, and source poll state.

Every function takes a keyword-only `session` and never commits: the caller owns the transaction,
so "store these records, then move the file away" is one unit. The edit-loop, commit and query
functions live in `store.work`, `store.commits` and `store.queries`.

Dedup and supersession (docs/ledger.md, "Dedup and conflicts"):
- A record whose normalised (prompt, target_new) matches a fact that is not superseded is a
  duplicate: only a `fact_origins` row is added.
- Otherwise a new pending fact is stored.
- When the record's fact is pending, editing or committed, every *other* pending fact with the same
  normalised prompt is superseded by it: the newest statement about a prompt wins.
- A committed fact with the same prompt and another target stays committed; the new fact links to
  it (`supersedes_id`), and `record_commit` marks it superseded once the new fact is committed.
- With `rules` (`store.trust.TrustRules`), a new fact may be stored `held` instead of pending
  (protected prompt, a source under review, a more trusted disagreeing fact, a source's limits), and
  between pending facts of one prompt from different sources the higher trust rank wins: the other
  is held (`conflict`); at equal ranks the newer one wins as above. Held facts supersede nothing.
  See `store.trust` and docs/trust.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import EllipsisType
from typing import Any

from sqlalchemy import Table, func, insert, select, text
from sqlalchemy.orm import Session

from store.bulk import bind_processor, insert_tuples, json_list_text, json_string, select_in, update_column
from store.db import serialise_writers
from store.errors import InvalidFact, LedgerError, UnknownSource
from store.models import Base, Fact, FactStatus, HoldReason, Rejection, Source, utc_now
from store.normalise import hash_normalised, normalise_text
from store.records import AddResult, FactIn, Origin, RejectionIn
from store.states import transition
from store.trust import SourceLoad, TrustRules, conflict_note, source_loads, source_names

#: Sources first seen in an `Origin` rather than through `ensure_source` get this kind.
ADHOC_SOURCE_KIND = "adhoc"
#: Column sizes of sources.name and sources.kind (store/models.py).
MAX_SOURCE_NAME, MAX_SOURCE_KIND = 200, 40
#: Longest excerpt stored for a rejection; ingest sends about 500 characters.
MAX_EXCERPT_CHARS = 2000
_LIVE = (FactStatus.PENDING, FactStatus.EDITING, FactStatus.COMMITTED)
# Tables for the bulk inserts of add_facts (see store.bulk).
FACTS = Base.metadata.tables["facts"]
FACT_ORIGINS = Base.metadata.tables["fact_origins"]
SOURCES = Base.metadata.tables["sources"]


def ensure_source(*, session: Session, name: str, kind: str, location: str) -> Source:
    """The source called `name`, created if missing; kind and location updated if they changed.

    A changed location resets the poll state (ETag, Last-Modified, cursor), which belonged to the
    old location.
    """
    _check_source_fields(name, kind)
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


def _check_source_fields(name: str, kind: str) -> None:
    if not name.strip() or len(name) > MAX_SOURCE_NAME:
        raise LedgerError(f"source name {name!r} must be 1 to {MAX_SOURCE_NAME} characters")
    if not kind.strip() or len(kind) > MAX_SOURCE_KIND:
        raise LedgerError(f"source kind {kind!r} (source {name!r}) must be 1 to {MAX_SOURCE_KIND} characters")


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


# One normalised record, as add_facts works on it: prompt, target_new, subject, ground_truth,
# rephrase_prompts and locality (JSON text, as stored), content hash, prompt hash.
_Prepared = tuple[str, str, str | None, str | None, str, str, str, str]
#: Columns of the facts insert, in the order add_facts builds its tuples (see _insert_new).
_FACT_COLUMNS = (
    "prompt",
    "target_new",
    "subject",
    "ground_truth",
    "rephrase_prompts",
    "locality",
    "content_hash",
    "prompt_hash",
    "id",
    "supersedes_id",
    "source_id",
    "origin_location",
    "origin_position",
    "external_id",
    "observed_at",
    "status",
    "attempts",
    "received_at",
    "status_changed_at",
    "queued_at",
    "hold_reason",
    "last_error",
)
_ORIGIN_COLUMNS = ("fact_id", "source_id", "location", "position", "external_id", "observed_at", "received_at")


@dataclass
class _Plan:
    """add_facts works out the whole batch in memory first; keys < 0 stand for facts not inserted yet.

    New fact -k is record `new_rows[k - 1]` of the batch.
    """

    status: dict[int, FactStatus] = field(default_factory=dict)
    hash_of: dict[int, str] = field(default_factory=dict)
    by_hash: dict[str, int] = field(default_factory=dict)  # content hash -> its non-superseded fact
    # prompt hash -> live facts, oldest first. Tuples rather than lists: the garbage collector stops
    # tracking a tuple of ints, and a batch holds one per distinct prompt.
    by_prompt: dict[str, tuple[int, ...]] = field(default_factory=dict)
    new_rows: list[int] = field(default_factory=list)
    new_supersedes: dict[int, int] = field(default_factory=dict)
    superseded_by: dict[int, int] = field(default_factory=dict)
    keys: list[int] = field(default_factory=list)
    #: pending facts a more trusted fact of their prompt outranked -> that fact (trust rules only)
    conflict_held: dict[int, int] = field(default_factory=dict)

    def hold_of(self, key: int) -> tuple[HoldReason, str] | None:
        """How new fact `key` is stored held (reason, words), or None: pending."""
        del key
        return None

    def supersede_others(self, key: int, phash: str) -> None:
        status, by_hash, hash_of = self.status, self.by_hash, self.hash_of
        kept = []
        for other in self.by_prompt.get(phash, ()):
            if other != key and status[other] is FactStatus.PENDING:
                status[other] = FactStatus.SUPERSEDED
                self.superseded_by[other] = key
                if by_hash.get(hash_of[other]) == other:
                    del by_hash[hash_of[other]]
            else:
                kept.append(other)
        self.by_prompt[phash] = tuple(kept)

    def place(self, prepared: Sequence[_Prepared]) -> int:
        """Map every record, in input order, to a fact (existing or new); returns the duplicate count.

        A record whose content hash is known maps to that fact (a duplicate); any other becomes new
        fact -k (`new_rows[k - 1]`), pending, linked to the newest earlier live fact of its prompt.
        A record whose fact is live then supersedes the other pending facts of its prompt.
        """
        status, hash_of, by_hash, by_prompt = self.status, self.hash_of, self.by_hash, self.by_prompt
        new_rows, keys, supersede_others = self.new_rows, self.keys, self.supersede_others
        pending = FactStatus.PENDING
        duplicates = 0
        for index, record in enumerate(prepared):
            chash = record[6]
            key = by_hash.get(chash)
            if key is None:
                key = -(len(new_rows) + 1)
                new_rows.append(index)
                status[key], hash_of[key], by_hash[chash] = pending, chash, key
                phash = record[7]
                earlier = by_prompt.get(phash)
                if not earlier:
                    # The only live fact of its prompt (the usual case): nothing to link or supersede.
                    by_prompt[phash] = (key,)
                    keys.append(key)
                    continue
                self.new_supersedes[key] = earlier[-1]
                by_prompt[phash] = (*earlier, key)
                supersede_others(key, phash)
            else:
                duplicates += 1
                if status[key] in _LIVE:
                    supersede_others(key, record[7])
            keys.append(key)
        return duplicates


class _TrustPlan(_Plan):
    """The plan under trust rules: new facts may be held, and ranks decide between pending facts of a prompt."""

    def __init__(
        self, rules: TrustRules, names: dict[int, str], loads: dict[int, SourceLoad], record_sources: list[int]
    ) -> None:
        super().__init__()
        self.rules = rules
        self.names = names
        self.loads = loads
        self.record_sources = record_sources
        self.source_of: dict[int, int] = {}  #: fact key -> its first source id
        self.holds: dict[int, tuple[HoldReason, str]] = {}  #: new fact key -> how it is held
        self.outranked_by: dict[int, int] = {}  #: new fact key held on arrival -> the more trusted fact

    def rank(self, key: int) -> int:
        return self.rules.rule(self.names[self.source_of[key]]).rank

    def hold_of(self, key: int) -> tuple[HoldReason, str] | None:
        return self.holds.get(key)

    def _arrival_hold(self, key: int, source_id: int, phash: str) -> tuple[HoldReason, str] | None:
        rules, name = self.rules, self.names[source_id]
        rule = rules.rule(name)
        if phash in rules.protected:
            return HoldReason.PROTECTED, f"held for review: its prompt is protected ({rules.protected[phash]})"
        if rule.policy == "review":
            return HoldReason.REVIEW, f"held for review: source {name} has policy review"
        rank = rule.rank
        for other in self.by_prompt.get(phash, ()):
            if self.status[other] is FactStatus.PENDING and self.rank(other) > rank:
                self.outranked_by[key] = other
                return HoldReason.CONFLICT, ""  # the words name the other fact's id, known after the insert
        return self.loads[source_id].limit_reason(rule)

    def supersede_others(self, key: int, phash: str) -> None:
        status, by_hash, hash_of = self.status, self.by_hash, self.hash_of
        rank = self.rank(key)
        kept = []
        for other in self.by_prompt.get(phash, ()):
            if other == key or status[other] is not FactStatus.PENDING or self.rank(other) > rank:
                kept.append(other)
            elif self.rank(other) == rank:
                status[other] = FactStatus.SUPERSEDED
                self.superseded_by[other] = key
                if by_hash.get(hash_of[other]) == other:
                    del by_hash[hash_of[other]]
            else:
                status[other] = FactStatus.HELD
                self.conflict_held[other] = key
        self.by_prompt[phash] = tuple(kept)

    def place(self, prepared: Sequence[_Prepared]) -> int:
        status, hash_of, by_hash, by_prompt = self.status, self.hash_of, self.by_hash, self.by_prompt
        duplicates = 0
        for index, record in enumerate(prepared):
            chash, phash = record[6], record[7]
            key = by_hash.get(chash)
            if key is None:
                key = -(len(self.new_rows) + 1)
                source_id = self.record_sources[index]
                self.new_rows.append(index)
                hash_of[key], by_hash[chash], self.source_of[key] = chash, key, source_id
                earlier = by_prompt.get(phash, ())
                if earlier:
                    self.new_supersedes[key] = earlier[-1]
                hold = self._arrival_hold(key, source_id, phash)
                if hold is not None:
                    status[key] = FactStatus.HELD
                    self.holds[key] = hold
                else:
                    status[key] = FactStatus.PENDING
                    load = self.loads[source_id]
                    load.queued_last_hour += 1
                    load.pending += 1
                    by_prompt[phash] = (*earlier, key)
                    self.supersede_others(key, phash)
            else:
                duplicates += 1
                if status[key] in _LIVE:
                    self.supersede_others(key, phash)
            self.keys.append(key)
        return duplicates


def add_facts(
    *, session: Session, items: Sequence[tuple[FactIn, Origin]], rules: TrustRules | None = None
) -> AddResult:
    """Store facts with their provenance, deduplicating and superseding as the module docstring says.

    With `rules`, new facts may be stored held and trust ranks decide between pending facts of a
    prompt (`store.trust`); `AddResult.held` counts the new facts held. Raises InvalidFact (naming
    the origin) for a fact whose prompt or target is empty after normalisation or whose
    `observed_at` is naive; nothing from the batch is written then.
    """
    if not items:
        return AddResult(accepted=0, duplicates=0, superseded=0, fact_ids=())
    now = utc_now()
    prepared = [_prepare(fact, origin) for fact, origin in items]
    serialise_writers(session)  # so that dedup sees every earlier batch, on Postgres too
    source_ids = _source_ids(session, [origin for _, origin in items])
    plan: _Plan
    if rules is None:
        plan = _Plan()
        _load_existing(session, plan, list({record[7] for record in prepared}))
    else:
        record_sources = [source_ids[origin.source] for _, origin in items]
        names = source_names(session)
        # Counting a source's load scans its facts: only for sources that have a limit.
        limited = [sid for sid in set(record_sources) if rules.rule(names[sid]).has_limits()]
        loads = {sid: SourceLoad() for sid in record_sources} | source_loads(session, limited, now)
        plan = trust_plan = _TrustPlan(rules, names, loads, record_sources)
        _load_existing(session, plan, list({record[7] for record in prepared}), trust_plan.source_of)
    duplicates = plan.place(prepared)
    shared = _Shared(session, items, source_ids, now)
    ids = _insert_new(session, plan, prepared, shared)
    fact_ids = [ids.get(key, key) for key in plan.keys]
    _insert_origins(session, fact_ids, shared)
    _supersede(session, {ids.get(older, older): ids.get(newer, newer) for older, newer in plan.superseded_by.items()})
    held = 0
    if isinstance(plan, _TrustPlan):
        _hold_outranked(session, plan, ids)
        held = len(plan.holds) + sum(1 for key in plan.conflict_held if key < 0)
    return AddResult(
        accepted=len(plan.new_rows),
        duplicates=duplicates,
        superseded=len(plan.superseded_by),
        fact_ids=tuple(fact_ids),
        held=held,
    )


def _hold_outranked(session: Session, plan: _TrustPlan, ids: dict[int, int]) -> None:
    """Write the words of arrival conflicts, and hold the pending facts a more trusted new fact outranked."""
    for key, winner in plan.outranked_by.items():
        note = _outranked_note(plan, winner, key, ids)
        session.execute(
            FACTS.update().where(FACTS.c.id == ids[key]).values(last_error=note),
            execution_options={"synchronize_session": False},
        )
    for loser, winner in plan.conflict_held.items():
        note = _outranked_note(plan, winner, loser, ids)
        transition(
            session=session, fact_ids=[ids.get(loser, loser)], to=FactStatus.HELD, error=note,
            hold_reason=HoldReason.CONFLICT,
        )


def _outranked_note(plan: _TrustPlan, winner: int, loser: int, ids: dict[int, int]) -> str:
    names = plan.names
    return conflict_note(
        ids.get(winner, winner), names[plan.source_of[winner]], plan.rank(winner), names[plan.source_of[loser]], plan.rank(loser)
    )


def _supersede(session: Session, newer_of: dict[int, int]) -> None:
    """Move each fact `older` of `newer_of` to superseded, with `superseded_by_id = newer_of[older]`.

    The status change is one `transition` call (row locks, the legality check, status_changed_at):
    it takes a single `superseded_by`, and one call per newer fact costs about a millisecond (a
    SELECT and an UPDATE) for what is typically one fact each. So every fact gets the first newer
    fact's id there, and the facts superseded by another one get their own id in one executemany
    right after, in the same transaction (transition has expired any of them loaded in the session).
    """
    if not newer_of:
        return
    first = next(iter(newer_of.values()))
    transition(session=session, fact_ids=list(newer_of), to=FactStatus.SUPERSEDED, superseded_by=first)
    others = [(newer, older) for older, newer in newer_of.items() if newer != first]
    update_column(session, FACTS, "superseded_by_id", "id", others)


def _prepare(fact: FactIn, origin: Origin) -> _Prepared:
    """The normalised record (see `_Prepared`); raises InvalidFact as add_facts says."""
    norm = normalise_text
    prompt, target = norm(fact.prompt), norm(fact.target_new)
    if not prompt or not target:
        field_name = "prompt" if not prompt else "target_new"
        raise InvalidFact(f"{_where(origin)}: {field_name} is empty after whitespace normalisation")
    if fact.observed_at is not None and fact.observed_at.tzinfo is None:
        raise InvalidFact(f"{_where(origin)}: observed_at {fact.observed_at.isoformat()} has no time zone; give UTC")
    # The JSON columns are built as text here, character for character as json.dumps writes the
    # lists (tests/store/test_ledger.py checks it), without the encoder's per-call overhead.
    quote = json_string
    locality = [
        f'{{"prompt": {quote(norm(item.prompt))}, "answer": {quote(norm(item.answer))}}}' for item in fact.locality
    ]
    return (
        prompt,
        target,
        # `and ... or None`: None stays None, and text that normalises to "" becomes None.
        (fact.subject and norm(fact.subject)) or None,
        (fact.ground_truth and norm(fact.ground_truth)) or None,
        json_list_text([text for text in map(norm, fact.rephrase_prompts) if text]),
        f"[{', '.join(locality)}]",
        *hash_normalised(prompt, target),
    )


class _Shared:
    """Per-record origin values in driver form, shared by the facts and fact_origins inserts."""

    def __init__(
        self, session: Session, items: Sequence[tuple[FactIn, Origin]], source_ids: dict[str, int], now: datetime
    ) -> None:
        to_driver = bind_processor(session, FACTS, "observed_at") or (lambda value: value)
        converted: dict[datetime, Any] = {}  # equal instants give equal stored values; convert each once
        self.origins: list[tuple[Any, ...]] = []
        append = self.origins.append
        for fact, origin in items:
            observed = fact.observed_at
            if observed is not None:
                value = converted.get(observed)
                if value is None:
                    value = converted[observed] = to_driver(observed)
                observed = value
            append((source_ids[origin.source], origin.location, origin.position, fact.external_id, observed))
        self.now = _to_driver(session, FACTS, "received_at", now)
        self.pending = _to_driver(session, FACTS, "status", FactStatus.PENDING)
        self._session = session

    def held(self, hold: tuple[HoldReason, str]) -> tuple[Any, ...]:
        """The tail of a facts row stored held (see `_insert_new`); not queued, so no `queued_at`."""
        status = _to_driver(self._session, FACTS, "status", FactStatus.HELD)
        reason = _to_driver(self._session, FACTS, "hold_reason", hold[0])
        return (status, 0, self.now, self.now, None, reason, hold[1] or None)


def _to_driver(session: Session, table: Table, name: str, value: Any) -> Any:
    process = bind_processor(session, table, name)
    return process(value) if process else value


def _where(origin: Origin) -> str:
    return f"{origin.source}: {origin.location}" + (f" {origin.position}" if origin.position else "")


def _source_ids(session: Session, origins: Sequence[Origin]) -> dict[str, int]:
    names = list(dict.fromkeys([origin.source for origin in origins]))  # in order of first appearance
    found: dict[str, int] = dict(select_in(session, SOURCES, ("name", "id"), "name", names))
    for name in names:
        if name not in found:
            location = next(origin.location for origin in origins if origin.source == name)
            found[name] = ensure_source(session=session, name=name, kind=ADHOC_SOURCE_KIND, location=location).id
    return found


def _load_existing(session: Session, plan: _Plan, prompts: list[str], source_of: dict[int, int] | None = None) -> None:
    # Equal content implies an equal prompt, so one lookup by prompt hash finds both the facts a
    # record may duplicate and the pending facts it may supersede.
    columns = ("id", "content_hash", "prompt_hash", "status", "source_id")
    found = select_in(session, FACTS, columns if source_of is not None else columns[:4], "prompt_hash", prompts)
    for fid, chash, phash, status_text, *source in sorted(found):
        if source_of is not None:
            source_of[fid] = source[0]
        status = FactStatus(status_text)
        if status is FactStatus.SUPERSEDED:
            continue
        plan.status[fid], plan.hash_of[fid] = status, chash
        current = plan.by_hash.get(chash)
        # Several non-superseded facts can share a hash after a revert; prefer a live one, then the newest.
        if current is None or status in _LIVE or plan.status[current] not in _LIVE:
            plan.by_hash[chash] = fid
        if status in _LIVE:
            plan.by_prompt[phash] = (*plan.by_prompt.get(phash, ()), fid)


def _allocate_ids(session: Session, count: int) -> list[int]:
    """Ids for `count` new facts, so they can be inserted without RETURNING (several times faster)."""
    if session.get_bind().dialect.name == "postgresql":
        query = text("SELECT nextval(pg_get_serial_sequence('facts', 'id')) FROM generate_series(1, :n)")
        return [int(fid) for fid in session.scalars(query, {"n": count})]
    # SQLite: the immediate transaction holds the write lock, so nobody else can take these ids.
    start = (session.scalar(select(func.max(Fact.id))) or 0) + 1
    return list(range(start, start + count))


def _insert_new(session: Session, plan: _Plan, prepared: Sequence[_Prepared], shared: _Shared) -> dict[int, int]:
    """Insert the planned new facts; returns placeholder key -> real id."""
    if not plan.new_rows:
        return {}
    new_ids = _allocate_ids(session, len(plan.new_rows))
    ids = dict(zip(range(-1, -len(new_ids) - 1, -1), new_ids, strict=True))
    links = {key: ids.get(earlier, earlier) for key, earlier in plan.new_supersedes.items()}  # supersedes_id
    # status, attempts, received_at, status_changed_at, queued_at, hold_reason, last_error
    tail = (shared.pending, 0, shared.now, shared.now, shared.now, None, None)
    origins = shared.origins
    hold_of = plan.hold_of
    values = [
        (*prepared[index], fid, links.get(key), *origins[index], *(tail if (hold := hold_of(key)) is None else shared.held(hold)))
        for key, index, fid in zip(ids, plan.new_rows, new_ids, strict=True)
    ]
    insert_tuples(session, FACTS, _FACT_COLUMNS, values)
    return ids


def _insert_origins(session: Session, fact_ids: Sequence[int], shared: _Shared) -> None:
    """One fact_origins row per record: `fact_ids[i]` is the fact record i maps to."""
    now = shared.now
    values = [(fid, *origin, now) for fid, origin in zip(fact_ids, shared.origins, strict=True)]
    insert_tuples(session, FACT_ORIGINS, _ORIGIN_COLUMNS, values)
