"""Every edge of the fact state machine: legal ones move the fact, illegal ones raise and change nothing."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from store import states
from store.errors import IllegalTransition, LedgerError, UnknownFact
from store.models import Fact, FactStatus, FailureCause, HoldReason
from store.states import LEGAL_TRANSITIONS, is_legal
from tests.store.factories import add, commit, fact, make_fact_in, status_of

S = FactStatus

EXPECTED_EDGES = {
    (S.PENDING, S.EDITING),
    (S.PENDING, S.SUPERSEDED),
    (S.EDITING, S.COMMITTED),
    (S.EDITING, S.REJECTED),
    (S.EDITING, S.FAILED),
    (S.EDITING, S.PENDING),
    (S.COMMITTED, S.REVERTED),
    (S.COMMITTED, S.SUPERSEDED),
    (S.SUPERSEDED, S.COMMITTED),
    (S.SUPERSEDED, S.REVERTED),
    (S.REJECTED, S.PENDING),
    (S.FAILED, S.PENDING),
    (S.REVERTED, S.PENDING),
    (S.PENDING, S.HELD),
    (S.HELD, S.PENDING),
    (S.HELD, S.REJECTED),
}


def test_transition_table_is_the_documented_one() -> None:
    assert set(LEGAL_TRANSITIONS) == EXPECTED_EDGES
    assert not any(is_legal(s, s) for s in FactStatus)


@pytest.mark.parametrize("current", list(FactStatus), ids=lambda s: s.value)
def test_every_edge_from(session: Session, current: FactStatus) -> None:
    (anchor,) = add(session, fact("anchor prompt", "a"))
    version = commit(session, anchor)
    (newer,) = add(session, fact("unrelated newer prompt", "n"))
    fid = make_fact_in(session, current, prompt="edge prompt")
    for target in FactStatus:
        savepoint = session.begin_nested()
        call = {
            "session": session,
            "fact_ids": [fid],
            "to": target,
            "error": "why",
            "superseded_by": newer,
            "commit_version": version,
            "hold_reason": HoldReason.REVIEW,
        }
        if (current, target) in EXPECTED_EDGES:
            assert states.transition(**call) == 1  # type: ignore[arg-type]
            assert status_of(session, fid) is target, f"{current} -> {target}"
        else:
            with pytest.raises(
                IllegalTransition, match=f"cannot move to {target.value}: fact {fid} is {current.value}"
            ):
                states.transition(**call)  # type: ignore[arg-type]
            assert status_of(session, fid) is current
        savepoint.rollback()


def test_transition_is_all_or_nothing(session: Session) -> None:
    pending, committed = add(session, fact("p1", "t")), add(session, fact("p2", "t"))
    commit(session, *committed)
    with pytest.raises(IllegalTransition, match=f"fact {committed[0]} is committed"):
        states.transition(session=session, fact_ids=pending + committed, to=S.EDITING)
    assert status_of(session, pending[0]) is S.PENDING


def test_side_effects(session: Session) -> None:
    (fid,) = add(session, fact())
    states.transition(session=session, fact_ids=[fid], to=S.EDITING)
    states.transition(session=session, fact_ids=[fid], to=S.FAILED, error="CUDA out of memory")
    states.transition(session=session, fact_ids=[fid], to=S.PENDING)
    states.transition(session=session, fact_ids=[fid], to=S.EDITING)
    row = session.get(Fact, fid)
    assert row is not None
    assert (row.attempts, row.last_error, row.status) == (2, "CUDA out of memory", S.EDITING)


def test_the_failure_cause_is_stored_with_the_error_it_explains(session: Session) -> None:
    (fid,) = add(session, fact())

    def cause() -> FailureCause | None:
        session.expire_all()
        row = session.get(Fact, fid)
        assert row is not None
        return row.failure_cause

    states.transition(session=session, fact_ids=[fid], to=S.EDITING)
    states.transition(
        session=session, fact_ids=[fid], to=S.PENDING, error="efficacy 0.5 < 0.9", failure_cause=FailureCause.EFFICACY
    )
    assert cause() is FailureCause.EFFICACY
    states.transition(session=session, fact_ids=[fid], to=S.EDITING)  # a claim keeps it: the gate reads it
    assert cause() is FailureCause.EFFICACY
    states.transition(
        session=session, fact_ids=[fid], to=S.FAILED, error="the edit raised OSError", failure_cause=FailureCause.ERROR
    )
    assert cause() is FailureCause.ERROR
    states.transition(session=session, fact_ids=[fid], to=S.PENDING)  # a requeue: no new error, nothing changes
    assert cause() is FailureCause.ERROR
    states.transition(session=session, fact_ids=[fid], to=S.EDITING)
    states.transition(session=session, fact_ids=[fid], to=S.PENDING, error="the daemon stopped")
    assert cause() is None  # a new error without a cause: the old cause no longer explains it


@pytest.mark.parametrize(
    ("to", "kwargs", "message"),
    [
        (S.REJECTED, {}, "needs an error message"),
        (S.FAILED, {"error": ""}, "needs an error message"),
        (S.SUPERSEDED, {}, "needs superseded_by"),
        (S.COMMITTED, {}, "needs commit_version"),
    ],
)
def test_missing_side_effect_arguments_are_refused(
    session: Session, to: FactStatus, kwargs: dict[str, str], message: str
) -> None:
    (fid,) = add(session, fact())
    if to is not S.SUPERSEDED:
        states.transition(session=session, fact_ids=[fid], to=S.EDITING)
    with pytest.raises(LedgerError, match=message):
        states.transition(session=session, fact_ids=[fid], to=to, **kwargs)  # type: ignore[arg-type]


def test_unknown_fact_and_empty_list(session: Session) -> None:
    with pytest.raises(UnknownFact, match="no fact with id 999"):
        states.transition(session=session, fact_ids=[999], to=S.EDITING)
    assert states.transition(session=session, fact_ids=[], to=S.EDITING) == 0
