"""The edit loop's work queue: claim_pending (also from two processes at once), recovery and requeue."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store import commits, states, work
from store.db import make_engine, make_session_factory
from store.errors import IllegalTransition, LedgerError
from store.models import Fact, FactOrigin, FactStatus
from tests.store.factories import add, commit, fact, status_of


def test_claim_pending_takes_oldest_first_and_counts_attempts(session: Session) -> None:
    ids = add(session, *(fact(f"p{i}", "t") for i in range(5)))
    claimed = work.claim_pending(session=session, limit=3)
    assert [f.id for f in claimed] == ids[:3]
    assert all(f.status is FactStatus.EDITING and f.attempts == 1 for f in claimed)
    assert [f.id for f in work.claim_pending(session=session, limit=10)] == ids[3:]
    assert work.claim_pending(session=session, limit=10) == []
    with pytest.raises(LedgerError, match="limit >= 1"):
        work.claim_pending(session=session, limit=0)


def _claimer(url: str, start: Any, results: Any) -> None:
    engine = make_engine(url, sqlite_busy_timeout_ms=20000)
    factory = make_session_factory(engine)
    mine: list[int] = []
    start.wait(timeout=30)
    try:
        while True:
            with factory() as session, session.begin():
                claimed = [f.id for f in work.claim_pending(session=session, limit=7)]
            if not claimed:
                break
            mine.extend(claimed)
        results.put(("ok", mine))
    except Exception as exc:  # report any failure to the parent instead of dying silently
        results.put(("error", repr(exc)))
    finally:
        engine.dispose()


def test_two_processes_never_claim_the_same_fact(db_url: str, session_factory: Callable[[], Session]) -> None:
    with session_factory() as session, session.begin():
        ids = add(session, *(fact(f"prompt {i}", "t") for i in range(300)))
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_claimer, args=(db_url, start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert [kind for kind, _ in outcomes] == ["ok", "ok"], outcomes
    first, second = (set(claimed) for _, claimed in outcomes)
    assert not first & second
    assert first | second == set(ids)
    assert sum(len(claimed) for _, claimed in outcomes) == len(ids)
    with session_factory() as session:
        assert {f.attempts for f in session.scalars(select(Fact))} == {1}


def _adder(url: str, start: Any, results: Any, offset: int) -> None:
    engine = make_engine(url, sqlite_busy_timeout_ms=20000)
    factory = make_session_factory(engine)
    start.wait(timeout=30)
    try:
        for begin in range(0, 200, 20):  # overlapping batches: every fact is sent by both processes
            batch = [fact(f"shared prompt {(i + offset) % 200}", "t") for i in range(begin, begin + 20)]
            with factory() as session, session.begin():
                add(session, *batch)
        results.put(("ok", offset))
    except Exception as exc:  # report any failure to the parent instead of dying silently
        results.put(("error", repr(exc)))
    finally:
        engine.dispose()


def test_two_processes_adding_the_same_facts_store_each_once(
    db_url: str, session_factory: Callable[[], Session]
) -> None:
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_adder, args=(db_url, start, results, offset)) for offset in (0, 100)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert [kind for kind, _ in outcomes] == ["ok", "ok"], outcomes
    with session_factory() as session:
        facts = session.scalars(select(Fact)).all()
        assert len(facts) == 200 and len({f.content_hash for f in facts}) == 200
        assert session.scalar(select(func.count()).select_from(FactOrigin)) == 400


def test_reset_stuck_editing_returns_claimed_facts_to_pending(session: Session) -> None:
    ids = add(session, fact("a", "1"), fact("b", "2"), fact("c", "3"))
    work.claim_pending(session=session, limit=2)
    assert work.reset_stuck_editing(session=session) == ids[:2]
    assert [status_of(session, i) for i in ids] == [FactStatus.PENDING] * 3
    assert work.reset_stuck_editing(session=session) == []


def test_requeue_by_ids_and_by_status(session: Session) -> None:
    ids = add(session, fact("a", "1"), fact("b", "2"), fact("c", "3"))
    work.claim_pending(session=session, limit=3)
    states.transition(session=session, fact_ids=ids[:2], to=FactStatus.FAILED, error="boom")
    states.transition(session=session, fact_ids=ids[2:], to=FactStatus.REJECTED, error="gate")
    assert work.requeue(session=session, status=FactStatus.FAILED) == ids[:2]
    assert work.requeue(session=session, fact_ids=[ids[2]]) == [ids[2]]
    assert [status_of(session, i) for i in ids] == [FactStatus.PENDING] * 3


def test_a_requeued_fact_gets_a_fresh_retry_budget(session: Session) -> None:
    ids = add(session, fact("a", "1"), fact("b", "2"))
    for _ in range(3):  # three tries, the gate sending the facts back after each of the first two
        work.claim_pending(session=session, limit=2)
        states.transition(session=session, fact_ids=ids, to=FactStatus.PENDING, error="retry")
    work.claim_pending(session=session, limit=2)
    states.transition(session=session, fact_ids=ids, to=FactStatus.FAILED, error="out of retries after 4 tries")
    assert {f.attempts for f in session.scalars(select(Fact).where(Fact.id.in_(ids)))} == {4}
    assert work.requeue(session=session, status=FactStatus.FAILED) == ids
    assert {f.attempts for f in session.scalars(select(Fact).where(Fact.id.in_(ids)))} == {0}
    assert [f.attempts for f in work.claim_pending(session=session, limit=2)] == [1, 1]


def test_requeue_refuses_other_states_and_bad_arguments(session: Session) -> None:
    (pending,) = add(session, fact())
    with pytest.raises(IllegalTransition, match=f"fact {pending} is pending"):
        work.requeue(session=session, fact_ids=[pending])
    with pytest.raises(LedgerError, match="cannot requeue facts in status committed"):
        work.requeue(session=session, status=FactStatus.COMMITTED)
    with pytest.raises(LedgerError, match="either fact ids or a status"):
        work.requeue(session=session)


def test_requeued_fact_supersedes_pending_fact_for_same_prompt(session: Session) -> None:
    (old,) = add(session, fact(target="Lyon"))
    version = commit(session, old)
    commits.revert_to(session=session, to_version=version - 1, reason=None, requested_by="test")
    (other,) = add(session, fact(target="Nice"))
    assert work.requeue(session=session, fact_ids=[old]) == [old]
    assert status_of(session, other) is FactStatus.SUPERSEDED
    row = session.get(Fact, other)
    assert row is not None and row.superseded_by_id == old
