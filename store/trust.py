"""Trust in the ledger: which new facts wait (held) instead of going to the edit queue, and the review queue.

`TrustRules` is what ingest hands the ledger with every batch (`store.intake.add_facts(rules=...)`):
per source its policy, trust rank and limits, and the protected prompts. The ledger decides, per new
fact, in this order (docs/trust.md):

1. its prompt is protected -> held (`protected`);
2. its source's policy is `review` -> held (`review`);
3. a pending fact of the same prompt from a more trusted source (higher rank) -> held (`conflict`);
   a pending fact from a less trusted source is held instead (`conflict`), one of equal rank is
   superseded (the newer statement wins, as before);
4. its source already queued `max_facts_per_hour` facts in the last hour -> held (`rate_limit`), or
   has `max_pending` facts pending or editing -> held (`pending_limit`);
5. otherwise pending. (Policy `off` never reaches the ledger: ingest records such records as rejections.)

Held facts leave the queue by `approve` (-> pending, the newest statement about its prompt: other
pending facts of the prompt are superseded), `reject` (-> rejected) or, for the two limits, by
`release_held` once their source is under its limits again. Every decision is a `reviews` row.
Approvals and rejections move a fact only while it is still held (`store.states.transition_if`), so
two reviewers deciding at once decide each fact once. Functions take a keyword-only `session` and
never commit, like the rest of the ledger API.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVarTuple

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import Session

from store.errors import LedgerError, UnknownFact, UnknownSource
from store.models import Fact, FactOrigin, FactStatus, HoldReason, Review, ReviewAction, Source, utc_now
from store.states import chunks, transition, transition_if

_Row = TypeVarTuple("_Row")
#: Reasons `release_held` lifts by itself; the others wait for a person.
LIMIT_REASONS = (HoldReason.RATE_LIMIT, HoldReason.PENDING_LIMIT)
#: Who `release_held` records as the reviewer of a release.
RELEASER = "daemon:limits"
#: Longest reviewer name and reason kept in the audit trail.
MAX_REVIEWER_CHARS, MAX_REASON_CHARS = 200, 2000
_WINDOW = timedelta(hours=1)


class Policy(enum.StrEnum):
    """A source's policy: what happens to its valid facts."""

    AUTO = "auto"  #: edited when valid (within the source's limits and the protected facts)
    REVIEW = "review"  #: held until a person approves
    OFF = "off"  #: not edited at all: ingest records every record as a rejection saying so


@dataclass(frozen=True)
class SourceRule:
    """One source's trust: its policy, its rank (higher wins a disagreement) and its limits (None: none)."""

    policy: Policy = Policy.AUTO
    rank: int = 0
    max_facts_per_hour: int | None = None
    max_pending: int | None = None

    def has_limits(self) -> bool:
        return self.max_facts_per_hour is not None or self.max_pending is not None


@dataclass(frozen=True)
class TrustRules:
    """The rules for every source by ledger name; `default` for a source not named; the protected prompts."""

    sources: Mapping[str, SourceRule] = field(default_factory=dict)
    default: SourceRule = SourceRule()
    #: normalised prompt hash (store.normalise) -> how to name the protected fact in a hold reason
    protected: Mapping[str, str] = field(default_factory=dict)

    def rule(self, source: str) -> SourceRule:
        return self.sources.get(source, self.default)


class NotWaiting(LedgerError):
    """A fact named for approval or rejection is not held (it is pending, committed, ... or decided already)."""


class NothingMatched(LedgerError, LookupError):
    """A review filter that matches no held fact."""


# --- intake: the per-source counts the limits need --------------------------------------------------------


@dataclass
class SourceLoad:
    """What a source has in the queue now: facts queued in the last hour and facts pending or editing."""

    queued_last_hour: int = 0
    pending: int = 0

    def limit_reason(self, rule: SourceRule) -> tuple[HoldReason, str] | None:
        """The limit a further fact from this source would break, with its words; None: within limits."""
        if rule.max_facts_per_hour is not None and self.queued_last_hour >= rule.max_facts_per_hour:
            return HoldReason.RATE_LIMIT, (
                f"held: its source queued {self.queued_last_hour} facts in the last hour "
                f"(max_facts_per_hour {rule.max_facts_per_hour}); released when under it again"
            )
        if rule.max_pending is not None and self.pending >= rule.max_pending:
            return HoldReason.PENDING_LIMIT, (
                f"held: its source has {self.pending} facts waiting to be edited (max_pending {rule.max_pending}); "
                "released when under it again"
            )
        return None


def source_loads(session: Session, source_ids: Sequence[int], now: datetime | None = None) -> dict[int, SourceLoad]:
    """The `SourceLoad` of each source id (by first arrival), counted in the ledger."""
    loads = {sid: SourceLoad() for sid in source_ids}
    if not loads:
        return loads
    since = (now or utc_now()) - _WINDOW
    recent = (
        select(Fact.source_id, func.count())
        .where(Fact.source_id.in_(list(loads)), Fact.queued_at > since)
        .group_by(Fact.source_id)
    )
    for sid, count in session.execute(recent):
        loads[sid].queued_last_hour = int(count)
    waiting = (
        select(Fact.source_id, func.count())
        .where(Fact.source_id.in_(list(loads)), Fact.status.in_((FactStatus.PENDING, FactStatus.EDITING)))
        .group_by(Fact.source_id)
    )
    for sid, count in session.execute(waiting):
        loads[sid].pending = int(count)
    return loads


def source_names(session: Session) -> dict[int, str]:
    """Every source id with its name (sources are few)."""
    return {sid: name for sid, name in session.execute(select(Source.id, Source.name))}


def conflict_note(winner: int, winner_source: str, winner_rank: int, loser_source: str, loser_rank: int) -> str:
    """The hold reason of a fact a more trusted one outranked."""
    return (
        f"held: fact {winner} from {winner_source} (trust rank {winner_rank}) disagrees on this prompt and its "
        f"source is more trusted than {loser_source} (rank {loser_rank})"
    )


# --- the review queue ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewFilter:
    """Which held facts a review command means; every given field must match (all None: every held fact)."""

    ids: tuple[int, ...] | None = None
    source: str | None = None  #: arrived from this source (any arrival)
    origin: str | None = None  #: arrived from this location (file path or URL), any arrival
    reason: HoldReason | None = None
    prompt_contains: str | None = None  #: case-insensitive substring of the prompt

    def describe(self) -> str:
        parts = []
        if self.ids is not None:
            parts.append("ids " + ", ".join(map(str, self.ids[:10])) + (" ..." if len(self.ids) > 10 else ""))
        for name in ("source", "origin", "reason", "prompt_contains"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name.replace('_', ' ')} {str(value)!r}")
        return ", ".join(parts) or "no filter"

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in ("ids", "source", "origin", "reason", "prompt_contains"))


@dataclass(frozen=True)
class HeldFact:
    """A fact in the review queue, with where it came from and why it waits."""

    id: int
    prompt: str
    target_new: str
    ground_truth: str | None
    source: str  #: the source it first arrived from
    location: str  #: where it first arrived from (file, URL, request)
    position: str | None
    hold_reason: str
    note: str | None  #: the hold reason in words
    received_at: datetime
    held_since: datetime


@dataclass(frozen=True)
class ReviewOutcome:
    """What one approve or reject did: the facts it moved, and those another reviewer decided meanwhile."""

    action: str
    decided: tuple[int, ...]
    skipped: tuple[int, ...] = ()
    superseded: tuple[int, ...] = ()  #: pending facts of the same prompts an approval superseded


@dataclass(frozen=True)
class QueueSummary:
    """The review queue at a glance: held facts by reason and source, and the oldest one's hold time."""

    held: int
    by_reason: dict[str, int]
    by_source: dict[str, dict[str, int]]  #: source -> reason -> count
    oldest_held_since: datetime | None


def queue_summary(session: Session) -> QueueSummary:
    """Counts of held facts (by reason, by first source and reason) and since when the oldest waits."""
    by_reason = {reason.value: 0 for reason in HoldReason}
    by_source: dict[str, dict[str, int]] = {}
    query = (
        select(Source.name, Fact.hold_reason, func.count())
        .join(Source, Source.id == Fact.source_id)
        .where(Fact.status == FactStatus.HELD)
        .group_by(Source.name, Fact.hold_reason)
    )
    total = 0
    for name, reason, count in session.execute(query):
        key = reason.value if reason is not None else "unknown"
        by_reason[key] = by_reason.get(key, 0) + int(count)
        by_source.setdefault(name, {})[key] = int(count)
        total += int(count)
    oldest = session.scalar(select(func.min(Fact.status_changed_at)).where(Fact.status == FactStatus.HELD))
    return QueueSummary(total, by_reason, by_source, oldest)


def held_facts(session: Session, selection: ReviewFilter = ReviewFilter(), limit: int | None = None) -> list[HeldFact]:
    """Held facts matching `selection`, oldest first; UnknownSource for a source not in the ledger."""
    query = (
        select(Fact, Source.name)
        .join(Source, Source.id == Fact.source_id)
        .where(Fact.status == FactStatus.HELD)
        .order_by(Fact.id)
        .limit(limit)
    )
    query = _matching(session, query, selection)
    return [
        HeldFact(
            id=fact.id,
            prompt=fact.prompt,
            target_new=fact.target_new,
            ground_truth=fact.ground_truth,
            source=name,
            location=fact.origin_location,
            position=fact.origin_position,
            hold_reason=fact.hold_reason.value if fact.hold_reason else "unknown",
            note=fact.last_error,
            received_at=fact.received_at,
            held_since=fact.status_changed_at,
        )
        for fact, name in session.execute(query)
    ]


def approve(*, session: Session, selection: ReviewFilter, reviewer: str, reason: str | None) -> ReviewOutcome:
    """Move the held facts `selection` names to pending; each becomes the newest statement about its prompt.

    Explicit ids must all exist (UnknownFact) and be held (NotWaiting), or nothing changes; a filter
    must match at least one held fact (NothingMatched). A fact another reviewer decided between the
    lookup and the update is skipped (`ReviewOutcome.skipped`). Every approval is a `reviews` row.
    """
    return _decide(session, selection, ReviewAction.APPROVED, reviewer, reason)


def reject(*, session: Session, selection: ReviewFilter, reviewer: str, reason: str | None) -> ReviewOutcome:
    """Move the held facts `selection` names to rejected (errors as `approve`); `last_error` says who and why."""
    return _decide(session, selection, ReviewAction.REJECTED, reviewer, reason)


def _decide(
    session: Session, selection: ReviewFilter, action: ReviewAction, reviewer: str, reason: str | None
) -> ReviewOutcome:
    reviewer = reviewer.strip()[:MAX_REVIEWER_CHARS]
    if not reviewer:
        raise LedgerError("a review needs the reviewer's name")
    reason = (reason or "").strip()[:MAX_REASON_CHARS] or None
    if selection.is_empty():
        raise LedgerError("name the facts to decide: ids, a source, an origin, a hold reason or a prompt filter")
    candidates = _candidates(session, selection)
    verb = "approve" if action is ReviewAction.APPROVED else "reject"
    if not candidates:
        raise NothingMatched(f"no held fact matches {selection.describe()}: nothing to {verb} (see `review`)")
    ids = list(candidates)
    if action is ReviewAction.APPROVED:
        moved = transition_if(session=session, fact_ids=ids, current=FactStatus.HELD, to=FactStatus.PENDING)
    else:
        why = f"rejected by {reviewer}" + (f": {reason}" if reason else "")
        moved = transition_if(session=session, fact_ids=ids, current=FactStatus.HELD, to=FactStatus.REJECTED, error=why)
    session.add_all(
        Review(fact_id=fid, action=action, hold_reason=candidates[fid], reviewer=reviewer, reason=reason) for fid in moved
    )
    superseded = supersede_for(session, moved) if action is ReviewAction.APPROVED else []
    skipped = tuple(fid for fid in ids if fid not in set(moved))
    return ReviewOutcome(action.value, tuple(moved), skipped, tuple(superseded))


def _candidates(session: Session, selection: ReviewFilter) -> dict[int, HoldReason | None]:
    """Held fact id -> its hold reason, for `selection`; explicit ids are checked one by one."""
    if selection.ids is not None:
        found: dict[int, tuple[FactStatus, HoldReason | None]] = {}
        for part in chunks(list(dict.fromkeys(selection.ids))):
            rows = session.execute(select(Fact.id, Fact.status, Fact.hold_reason).where(Fact.id.in_(part)))
            found.update({fid: (status, reason) for fid, status, reason in rows})
        missing = [fid for fid in selection.ids if fid not in found]
        if missing:
            raise UnknownFact(f"no fact with id {', '.join(map(str, missing[:10]))} in the ledger")
        not_held = [f"fact {fid} is {found[fid][0].value}" for fid in selection.ids if found[fid][0] is not FactStatus.HELD]
        if not_held:
            raise NotWaiting(
                "only held facts can be approved or rejected: " + "; ".join(not_held[:10]) + " (see `review`)"
            )
    query = select(Fact.id, Fact.hold_reason).where(Fact.status == FactStatus.HELD).order_by(Fact.id)
    query = _matching(session, query, selection)
    return {fid: reason for fid, reason in session.execute(query)}


def _matching(session: Session, query: Select[*_Row], selection: ReviewFilter) -> Select[*_Row]:
    if selection.ids is not None:
        query = query.where(Fact.id.in_(list(selection.ids)))
    if selection.reason is not None:
        query = query.where(Fact.hold_reason == selection.reason)
    if selection.prompt_contains is not None:
        query = query.where(func.lower(Fact.prompt).contains(selection.prompt_contains.lower(), autoescape=True))
    if selection.source is not None:
        source_id = session.scalar(select(Source.id).where(Source.name == selection.source))
        if source_id is None:
            known = ", ".join(session.scalars(select(Source.name).order_by(Source.name))) or "none yet"
            raise UnknownSource(f"no source named {selection.source!r} in the ledger (known: {known})")
        query = query.where(exists().where(FactOrigin.fact_id == Fact.id, FactOrigin.source_id == source_id))
    if selection.origin is not None:
        query = query.where(exists().where(FactOrigin.fact_id == Fact.id, FactOrigin.location == selection.origin))
    return query


def supersede_for(session: Session, winners: Sequence[int]) -> list[int]:
    """Supersede every other pending fact of the prompts of `winners` (of several winners of one prompt, the
    highest id wins); returns the superseded ids. The rule of an operator's decision (approve, requeue)."""
    winner: dict[str, int] = {}
    for part in chunks(list(winners)):
        for fid, phash in session.execute(select(Fact.id, Fact.prompt_hash).where(Fact.id.in_(part))):
            winner[phash] = max(fid, winner.get(phash, fid))
    losers: dict[int, list[int]] = {}
    for part in chunks(list(winner)):
        query = select(Fact.id, Fact.prompt_hash).where(Fact.prompt_hash.in_(part), Fact.status == FactStatus.PENDING)
        for fid, phash in session.execute(query):
            if fid != winner[phash]:
                losers.setdefault(winner[phash], []).append(fid)
    for newer, older in losers.items():
        transition(session=session, fact_ids=older, to=FactStatus.SUPERSEDED, superseded_by=newer)
    return sorted(fid for group in losers.values() for fid in group)


# --- releasing facts held by a limit ------------------------------------------------------------------------


def release_held(*, session: Session, rules: TrustRules, now: datetime | None = None) -> dict[str, list[int]]:
    """Release facts held by a limit whose source is under its limits again; returns source -> released ids.

    Per source, oldest first, as many as both limits leave room for now (facts queued in the last hour
    against `max_facts_per_hour`, facts pending or editing against `max_pending`); a limit no longer
    configured leaves unlimited room. A released fact meets the pending facts of its prompt as a new
    one would: the higher rank wins, and at equal ranks the newer fact (higher id); the loser is held
    (`conflict`) or superseded. Each release is a `reviews` row by `daemon:limits`.
    """
    now = now or utc_now()
    query = (
        select(Fact.source_id, Fact.id)
        .where(Fact.status == FactStatus.HELD, Fact.hold_reason.in_(LIMIT_REASONS))
        .order_by(Fact.id)
    )
    waiting: dict[int, list[int]] = {}
    for sid, fid in session.execute(query):
        waiting.setdefault(sid, []).append(fid)
    if not waiting:
        return {}
    names = source_names(session)
    loads = source_loads(session, list(waiting), now)
    released: dict[str, list[int]] = {}
    for sid, ids in waiting.items():
        rule, load = rules.rule(names[sid]), loads[sid]
        room = len(ids)
        if rule.max_facts_per_hour is not None:
            room = min(room, rule.max_facts_per_hour - load.queued_last_hour)
        if rule.max_pending is not None:
            room = min(room, rule.max_pending - load.pending)
        if room <= 0:
            continue
        reasons: dict[int, HoldReason | None] = {
            fid: reason for fid, reason in session.execute(select(Fact.id, Fact.hold_reason).where(Fact.id.in_(ids[:room])))
        }
        moved = transition_if(session=session, fact_ids=ids[:room], current=FactStatus.HELD, to=FactStatus.PENDING)
        session.add_all(
            Review(fact_id=fid, action=ReviewAction.RELEASED, hold_reason=reasons.get(fid), reviewer=RELEASER,
                   reason=f"{names[sid]} is under its limits again")
            for fid in moved
        )
        if moved:
            released[names[sid]] = moved
    resolve_by_rank(session, [fid for ids in released.values() for fid in ids], rules, names)
    return released


def resolve_by_rank(session: Session, fact_ids: Sequence[int], rules: TrustRules, names: Mapping[int, str]) -> None:
    """Settle the pending facts of the prompts of `fact_ids`: the most trusted (then newest) stays pending,
    less trusted ones are held (`conflict`), equally trusted older ones superseded."""
    if not fact_ids:
        return
    prompts = list({phash for phash in session.scalars(select(Fact.prompt_hash).where(Fact.id.in_(list(fact_ids))))})
    rows: dict[str, list[tuple[int, int]]] = {}
    for part in chunks(prompts):
        query = select(Fact.prompt_hash, Fact.id, Fact.source_id).where(
            Fact.prompt_hash.in_(part), Fact.status == FactStatus.PENDING
        )
        for phash, fid, sid in session.execute(query):
            rows.setdefault(phash, []).append((fid, sid))
    for group in rows.values():
        if len(group) < 2:
            continue
        ranked = sorted(group, key=lambda row: (rules.rule(names[row[1]]).rank, row[0]))
        best, best_source = ranked[-1]
        best_rank = rules.rule(names[best_source]).rank
        for fid, sid in ranked[:-1]:
            rank = rules.rule(names[sid]).rank
            if rank < best_rank:
                note = conflict_note(best, names[best_source], best_rank, names[sid], rank)
                transition(session=session, fact_ids=[fid], to=FactStatus.HELD, error=note, hold_reason=HoldReason.CONFLICT)
            else:
                transition(session=session, fact_ids=[fid], to=FactStatus.SUPERSEDED, superseded_by=best)


def reviews_of(session: Session, fact_id: int) -> list[Review]:
    """The review rows of one fact, oldest first."""
    return list(session.scalars(select(Review).where(Review.fact_id == fact_id).order_by(Review.id)))
