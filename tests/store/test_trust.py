"""Trust in the ledger: holds at intake, ranks between sources, the review queue, limits and their release."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from store import intake, trust
from store.db import make_engine, make_session_factory
from store.errors import UnknownFact, UnknownSource
from store.models import Fact, FactStatus, HoldReason, Review, ReviewAction, utc_now
from store.normalise import hash_normalised, normalise_text
from store.trust import NothingMatched, NotWaiting, Policy, ReviewFilter, SourceRule, TrustRules
from tests.store.factories import fact, origin, status_of

S = FactStatus
RULES = TrustRules(
    sources={
        "feed:news": SourceRule(policy=Policy.REVIEW, rank=0),
        "inbox": SourceRule(rank=10),
        "api": SourceRule(rank=10),
        "cheap": SourceRule(rank=1),
        "limited": SourceRule(max_facts_per_hour=2),
        "narrow": SourceRule(max_pending=1),
    },
)


def add(session: Session, *facts: Any, source: str, rules: TrustRules = RULES, location: str = "f.jsonl") -> list[int]:
    items = [(f, origin(source, location=location, position=f"line {i + 1}")) for i, f in enumerate(facts)]
    return list(intake.add_facts(session=session, items=items, rules=rules).fact_ids)


def row(session: Session, fid: int) -> Fact:
    session.expire_all()
    found = session.get(Fact, fid)
    assert found is not None
    return found


def test_review_policy_holds_new_facts_and_they_supersede_nothing(session: Session) -> None:
    (pending,) = add(session, fact("The CEO of Acme is", "Jane Roe"), source="cheap")
    result = intake.add_facts(
        session=session, items=[(fact("The CEO of Acme is", "John Doe"), origin("feed:news"))], rules=RULES
    )
    (held,) = result.fact_ids
    assert result.held == 1
    assert status_of(session, held) is S.HELD and status_of(session, pending) is S.PENDING
    assert row(session, held).hold_reason is HoldReason.REVIEW
    assert "feed:news has policy review" in (row(session, held).last_error or "")
    assert row(session, held).queued_at is None and row(session, pending).queued_at is not None


def test_without_rules_everything_is_pending_as_before(session: Session) -> None:
    items = [(fact("p", "t"), origin("feed:news"))]
    (fid,) = intake.add_facts(session=session, items=items).fact_ids
    assert status_of(session, fid) is S.PENDING


def test_protected_prompt_is_held_whatever_the_policy(session: Session) -> None:
    prompt_hash = hash_normalised(normalise_text("The CEO of Acme is"), "x")[1]
    rules = TrustRules(sources=RULES.sources, protected={prompt_hash: "protected.jsonl line 1"})
    (fid,) = add(session, fact("  The CEO of   Acme is", "John Doe"), source="inbox", rules=rules)
    assert row(session, fid).hold_reason is HoldReason.PROTECTED
    assert "protected.jsonl line 1" in (row(session, fid).last_error or "")


def test_higher_rank_wins_and_the_lower_is_held_with_the_reason(session: Session) -> None:
    (low,) = add(session, fact("Acme is led by", "A"), source="cheap")
    (high,) = add(session, fact("Acme is led by", "B"), source="inbox")
    assert status_of(session, high) is S.PENDING
    assert status_of(session, low) is S.HELD
    note = row(session, low).last_error or ""
    assert row(session, low).hold_reason is HoldReason.CONFLICT
    assert f"fact {high} from inbox (trust rank 10)" in note and "cheap (rank 1)" in note
    # a newer but less trusted fact is held on arrival, and the pending one stays
    (later_low,) = add(session, fact("Acme is led by", "C"), source="cheap")
    assert status_of(session, later_low) is S.HELD and status_of(session, high) is S.PENDING
    assert f"fact {high} from inbox" in (row(session, later_low).last_error or "")


def test_equal_ranks_the_newer_supersedes(session: Session) -> None:
    (older,) = add(session, fact("Acme is led by", "A"), source="inbox")
    (newer,) = add(session, fact("Acme is led by", "B"), source="api")
    assert status_of(session, older) is S.SUPERSEDED and status_of(session, newer) is S.PENDING


def test_ranks_within_one_batch(session: Session) -> None:
    items = [
        (fact("Acme is led by", "A"), origin("cheap")),
        (fact("Acme is led by", "B"), origin("inbox")),
        (fact("Acme is led by", "C"), origin("cheap")),
    ]
    a, b, c = intake.add_facts(session=session, items=items, rules=RULES).fact_ids
    assert [status_of(session, fid) for fid in (a, b, c)] == [S.HELD, S.PENDING, S.HELD]


def test_rate_limit_holds_beyond_n_an_hour_and_releases_later(session: Session) -> None:
    ids = add(session, *(fact(f"p{i}", "t") for i in range(4)), source="limited")
    assert [status_of(session, fid) for fid in ids] == [S.PENDING, S.PENDING, S.HELD, S.HELD]
    assert row(session, ids[2]).hold_reason is HoldReason.RATE_LIMIT
    assert "max_facts_per_hour 2" in (row(session, ids[2]).last_error or "")
    assert trust.release_held(session=session, rules=RULES) == {}  # still two queued within the hour
    # an hour later the window is empty again: both are released, oldest first, and audited
    assert trust.release_held(session=session, rules=RULES, now=utc_now() + timedelta(hours=1, seconds=1)) == {
        "limited": ids[2:]
    }
    assert [status_of(session, fid) for fid in ids[2:]] == [S.PENDING, S.PENDING]
    reviews = session.scalars(select(Review).where(Review.fact_id == ids[2])).all()
    assert [(r.action, r.reviewer, r.hold_reason) for r in reviews] == [
        (ReviewAction.RELEASED, "daemon:limits", HoldReason.RATE_LIMIT)
    ]


def test_pending_limit_holds_and_releases_when_the_queue_drains(session: Session) -> None:
    first, second, third = add(session, fact("a", "t"), fact("b", "t"), fact("c", "t"), source="narrow")
    assert [status_of(session, f) for f in (first, second, third)] == [S.PENDING, S.HELD, S.HELD]
    assert row(session, second).hold_reason is HoldReason.PENDING_LIMIT
    assert trust.release_held(session=session, rules=RULES) == {}
    from store import states

    states.transition(session=session, fact_ids=[first], to=S.EDITING)
    states.transition(session=session, fact_ids=[first], to=S.FAILED, error="x")
    assert trust.release_held(session=session, rules=RULES) == {"narrow": [second]}  # room for one
    assert status_of(session, third) is S.HELD
    # a limit taken out of the configuration leaves unlimited room
    assert trust.release_held(session=session, rules=TrustRules()) == {"narrow": [third]}


def test_release_meets_a_more_trusted_pending_fact(session: Session) -> None:
    rules = TrustRules(sources={**RULES.sources, "narrow": SourceRule(max_pending=1, rank=0)})
    add(session, fact("filler", "t"), source="narrow", rules=rules)
    (held,) = add(session, fact("Acme is led by", "A"), source="narrow", rules=rules)
    (trusted,) = add(session, fact("Acme is led by", "B"), source="inbox", rules=rules)
    session.execute(text("UPDATE facts SET status = 'rejected', last_error = 'x' WHERE prompt = 'filler'"))
    assert trust.release_held(session=session, rules=rules) == {"narrow": [held]}
    assert status_of(session, held) is S.HELD and row(session, held).hold_reason is HoldReason.CONFLICT
    assert status_of(session, trusted) is S.PENDING


def test_approve_and_reject_by_id_with_the_audit_trail(session: Session) -> None:
    a, b = add(session, fact("p1", "t"), fact("p2", "t"), source="feed:news")
    outcome = trust.approve(session=session, selection=ReviewFilter(ids=(a,)), reviewer="cli:alice", reason="checked")
    assert outcome.decided == (a,) and outcome.skipped == ()
    assert status_of(session, a) is S.PENDING and row(session, a).hold_reason is None
    assert row(session, a).queued_at is not None
    trust.reject(session=session, selection=ReviewFilter(ids=(b,)), reviewer="cli:bob", reason="wrong")
    assert status_of(session, b) is S.REJECTED
    assert row(session, b).last_error == "rejected by cli:bob: wrong"
    audit = [(r.fact_id, r.action, r.reviewer, r.reason, r.hold_reason) for r in trust.reviews_of(session, a)]
    assert audit == [(a, ReviewAction.APPROVED, "cli:alice", "checked", HoldReason.REVIEW)]


def test_approval_is_the_newest_statement_about_its_prompt(session: Session) -> None:
    (pending,) = add(session, fact("Acme is led by", "A"), source="inbox")
    (held,) = add(session, fact("Acme is led by", "B"), source="feed:news")
    outcome = trust.approve(session=session, selection=ReviewFilter(ids=(held,)), reviewer="r", reason=None)
    assert outcome.superseded == (pending,)
    assert status_of(session, pending) is S.SUPERSEDED and status_of(session, held) is S.PENDING


def test_filters_by_source_origin_reason_and_prompt(session: Session) -> None:
    a, b = add(session, fact("Paris is in", "France"), fact("Rome is in", "Italy"), source="feed:news", location="u1")
    (c,) = add(session, fact("Oslo is in", "Norway"), source="feed:news", location="u2")
    assert [h.id for h in trust.held_facts(session, ReviewFilter(origin="u1"))] == [a, b]
    assert [h.id for h in trust.held_facts(session, ReviewFilter(prompt_contains="OSLO"))] == [c]
    assert [h.id for h in trust.held_facts(session, ReviewFilter(reason=HoldReason.REVIEW, source="feed:news"))] == [a, b, c]
    outcome = trust.reject(session=session, selection=ReviewFilter(origin="u2"), reviewer="r", reason="bad file")
    assert outcome.decided == (c,)
    summary = trust.queue_summary(session)
    assert summary.held == 2 and summary.by_reason["review"] == 2 and summary.by_source == {"feed:news": {"review": 2}}
    assert summary.oldest_held_since is not None


def test_bad_review_input_is_refused_with_a_clear_error(session: Session) -> None:
    (held,) = add(session, fact("p", "t"), source="feed:news")
    (pending,) = add(session, fact("q", "t"), source="inbox")
    with pytest.raises(UnknownFact, match="no fact with id 999"):
        trust.approve(session=session, selection=ReviewFilter(ids=(held, 999)), reviewer="r", reason=None)
    with pytest.raises(NotWaiting, match=f"fact {pending} is pending"):
        trust.approve(session=session, selection=ReviewFilter(ids=(held, pending)), reviewer="r", reason=None)
    assert status_of(session, held) is S.HELD  # nothing changed
    with pytest.raises(NothingMatched, match="no held fact matches origin 'nowhere'"):
        trust.reject(session=session, selection=ReviewFilter(origin="nowhere"), reviewer="r", reason=None)
    with pytest.raises(UnknownSource, match="no source named 'ghost'"):
        trust.approve(session=session, selection=ReviewFilter(source="ghost"), reviewer="r", reason=None)
    with pytest.raises(trust.LedgerError, match="name the facts"):
        trust.approve(session=session, selection=ReviewFilter(), reviewer="r", reason=None)
    trust.approve(session=session, selection=ReviewFilter(ids=(held,)), reviewer="r", reason=None)
    with pytest.raises(NotWaiting, match=f"fact {held} is pending"):
        trust.approve(session=session, selection=ReviewFilter(ids=(held,)), reviewer="r", reason=None)


def _approver(url: str, start: Any, results: Any) -> None:
    engine = make_engine(url, sqlite_busy_timeout_ms=20000)
    factory = make_session_factory(engine)
    start.wait(timeout=30)
    try:
        with factory() as session, session.begin():
            outcome = trust.approve(
                session=session, selection=ReviewFilter(source="feed:news"), reviewer="racer", reason=None
            )
        results.put(("ok", list(outcome.decided), list(outcome.skipped)))
    except NothingMatched:  # the other reviewer had decided every fact before this one looked
        results.put(("ok", [], []))
    except Exception as exc:  # report any failure to the parent instead of dying silently
        results.put(("error", repr(exc), []))
    finally:
        engine.dispose()


def test_two_reviewers_approving_at_once_decide_each_fact_once(
    db_url: str, session_factory: Callable[[], Session]
) -> None:
    with session_factory() as session, session.begin():
        ids = add(session, *(fact(f"prompt {i}", "t") for i in range(200)), source="feed:news")
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_approver, args=(db_url, start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert [kind for kind, *_ in outcomes] == ["ok", "ok"], outcomes
    first, second = (set(decided) for _, decided, _ in outcomes)
    assert not first & second and first | second == set(ids)
    skipped = {fid for _, _, passed in outcomes for fid in passed}
    assert skipped <= set(ids)  # what one reviewer skipped, the other decided
    with session_factory() as session:
        audit = session.scalars(select(Review.fact_id).where(Review.action == ReviewAction.APPROVED)).all()
        assert sorted(audit) == sorted(ids)  # one audit row per fact: each approved exactly once
        assert {status_of(session, fid) for fid in ids} == {S.PENDING}


def test_held_status_and_reasons_are_checked_by_the_database(session: Session) -> None:
    (fid,) = add(session, fact("p", "t"), source="feed:news")
    savepoint = session.begin_nested()
    with pytest.raises(Exception, match=r"(?i)check|constraint"):
        session.execute(text(f"UPDATE facts SET hold_reason = 'whim' WHERE id = {fid}"))
    savepoint.rollback()
    assert row(session, fid).hold_reason is HoldReason.REVIEW
