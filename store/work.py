"""Ledger functions of the edit loop's work queue: claim pending facts, recover stuck ones, requeue.

Like the rest of the ledger API these take a keyword-only `session` and never commit. A fact's
`attempts` counts the claims since it last entered the queue: arrival or an explicit requeue starts
it at 0; a retry the gate asks for, or a claim undone by a crash, does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.errors import LedgerError
from store.models import Fact, FactStatus
from store.states import chunks, transition

#: The statuses `requeue` accepts: the end states a fact can be given another try from.
REQUEUEABLE = (FactStatus.REJECTED, FactStatus.FAILED, FactStatus.REVERTED)


def pending_backlog(session: Session) -> tuple[int, datetime | None]:
    """How many facts are pending, and since when the longest-waiting one has been (None: no pending fact).

    "Since when" is the time it became pending (arrival, or a requeue or retry), so a retried fact
    does not count as having waited since it first arrived.
    """
    count, oldest = session.execute(
        select(func.count(Fact.id), func.min(Fact.status_changed_at)).where(Fact.status == FactStatus.PENDING)
    ).one()
    return int(count or 0), oldest


def claim_pending(*, session: Session, limit: int) -> list[Fact]:
    """Move up to `limit` pending facts, oldest first, to `editing` and return them (ordered by id).

    Safe with several processes claiming at once: Postgres skips rows another transaction has
    locked (FOR UPDATE SKIP LOCKED); on SQLite the session's immediate transaction holds the write
    lock, so claimers run one after the other. A fact is never claimed twice.
    """
    if limit < 1:
        raise LedgerError(f"claim_pending needs limit >= 1, got {limit}")
    query = (
        select(Fact.id)
        .where(Fact.status == FactStatus.PENDING)
        .order_by(Fact.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(session.scalars(query))
    transition(session=session, fact_ids=ids, to=FactStatus.EDITING)
    return list(session.scalars(select(Fact).where(Fact.id.in_(ids)).order_by(Fact.id))) if ids else []


def reset_stuck_editing(*, session: Session) -> list[int]:
    """Move every fact left in `editing` (the process stopped mid-edit) back to `pending`; returns their ids.

    Call once at start, before the edit loop claims anything.
    """
    ids = list(session.scalars(select(Fact.id).where(Fact.status == FactStatus.EDITING).order_by(Fact.id)))
    transition(session=session, fact_ids=ids, to=FactStatus.PENDING)
    return ids


def requeue(*, session: Session, fact_ids: Sequence[int] | None = None, status: FactStatus | None = None) -> list[int]:
    """Give rejected, failed or reverted facts another try: move them to `pending`; returns their ids.

    Pass either `fact_ids` (each must be rejected, failed or reverted, or IllegalTransition is
    raised and nothing changes) or `status` (every fact in that status). A requeued fact gets a fresh
    retry budget (`attempts` back to 0), so the edit loop edits it again rather than failing it at once
    for the tries of its earlier round. A requeue is the newest statement about its prompt: any other
    pending fact with the same prompt is superseded by the requeued one (of several requeued facts with
    one prompt, the highest id wins).
    """
    if (fact_ids is None) == (status is None):
        raise LedgerError("requeue needs either fact ids or a status, not both and not neither")
    if status is not None:
        if status not in REQUEUEABLE:
            allowed = ", ".join(s.value for s in REQUEUEABLE)
            raise LedgerError(f"cannot requeue facts in status {status.value}; allowed: {allowed}")
        fact_ids = list(session.scalars(select(Fact.id).where(Fact.status == status).order_by(Fact.id)))
    ids = sorted(set(fact_ids or ()))
    transition(session=session, fact_ids=ids, to=FactStatus.PENDING)
    for part in chunks(ids):
        session.execute(update(Fact).where(Fact.id.in_(part)).values(attempts=0))
    _supersede_older_pending(session, ids)
    return ids


def _supersede_older_pending(session: Session, requeued: list[int]) -> None:
    winner: dict[str, int] = {}
    for part in chunks(requeued):
        for fid, phash in session.execute(select(Fact.id, Fact.prompt_hash).where(Fact.id.in_(part))):
            winner[phash] = max(fid, winner.get(phash, fid))
    losers: dict[int, list[int]] = {}
    prompts = list(winner)
    for part in chunks(prompts):
        query = select(Fact.id, Fact.prompt_hash).where(Fact.prompt_hash.in_(part), Fact.status == FactStatus.PENDING)
        for fid, phash in session.execute(query):
            if fid != winner[phash]:
                losers.setdefault(winner[phash], []).append(fid)
    for newer, older in losers.items():
        transition(session=session, fact_ids=older, to=FactStatus.SUPERSEDED, superseded_by=newer)
