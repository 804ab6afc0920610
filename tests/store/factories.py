"""Small builders for ledger tests: facts, origins and a fact driven to a given status."""

from __future__ import annotations

from sqlalchemy.orm import Session

from store import commits, intake, states
from store.models import Fact, FactStatus, HoldReason
from store.records import CommitIn, FactIn, Origin


def origin(source: str = "inbox", location: str = "facts.jsonl", position: str | None = "line 1") -> Origin:
    return Origin(source=source, location=location, position=position)


def fact(prompt: str = "The capital of France is", target: str = "Lyon", **fields: object) -> FactIn:
    return FactIn(prompt=prompt, target_new=target, **fields)  # type: ignore[arg-type]


def add(session: Session, *facts: FactIn, source: str = "inbox") -> list[int]:
    """Add facts (one origin line each) and return their ids."""
    items = [(f, origin(source, position=f"line {i + 1}")) for i, f in enumerate(facts)]
    return list(intake.add_facts(session=session, items=items).fact_ids)


def commit(session: Session, *fact_ids: int) -> int:
    """Claim exactly these pending facts and commit them; returns the new version."""
    states.transition(session=session, fact_ids=list(fact_ids), to=FactStatus.EDITING)
    return commits.record_commit(session=session, commit=CommitIn(fact_ids=tuple(fact_ids))).version


def status_of(session: Session, fact_id: int) -> FactStatus:
    session.expire_all()
    found = session.get(Fact, fact_id)
    assert found is not None
    return found.status


def make_fact_in(session: Session, status: FactStatus, prompt: str = "p") -> int:
    """A fact in `status`, reached through legal transitions only."""
    (fid,) = add(session, fact(prompt, "t"))
    path = {
        FactStatus.PENDING: [],
        FactStatus.EDITING: [FactStatus.EDITING],
        FactStatus.REJECTED: [FactStatus.EDITING, FactStatus.REJECTED],
        FactStatus.FAILED: [FactStatus.EDITING, FactStatus.FAILED],
        FactStatus.HELD: [FactStatus.HELD],
    }
    if status in path:
        for step in path[status]:
            states.transition(session=session, fact_ids=[fid], to=step, error="x", hold_reason=HoldReason.CONFLICT)
        return fid
    commit(session, fid)
    if status is FactStatus.REVERTED:
        commits.revert_last(session=session, count=1, reason=None, requested_by="test")
    elif status is FactStatus.SUPERSEDED:
        (newer,) = add(session, fact(prompt, "t2"))
        commit(session, newer)
    assert status_of(session, fid) is status
    return fid
