"""Read-only queries: status summary, fact and commit details, filters and the export format."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.orm import Session

from store import commits, intake, states, work
from store.errors import UnknownFact, UnknownSource, UnknownVersion
from store.models import FactStatus, FailureCause, ProbeKind
from store.queries import (
    commit_detail,
    commit_gate_scores,
    export_facts,
    fact_detail,
    find_facts,
    list_reverts,
    pending_failure_causes,
    status_summary,
)
from tests.store.factories import add, commit, fact


def test_status_summary_counts_by_status_and_by_every_source(session: Session) -> None:
    (a,) = add(session, fact("a", "1"), source="inbox")
    add(session, fact("a", "1"), fact("b", "2"), source="feed:x")
    commit(session, a)
    intake.update_source_poll_state(session=session, name="feed:x", ok=False, error="HTTP 500")
    summary = status_summary(session)
    assert summary.by_status["committed"] == 1 and summary.by_status["pending"] == 1
    assert summary.by_status["rejected"] == 0
    assert summary.by_source == {"inbox": {"committed": 1}, "feed:x": {"committed": 1, "pending": 1}}
    assert summary.current_version == 1 and summary.last_commit is not None
    assert summary.last_commit.fact_ids == (a,)
    feed = next(s for s in summary.sources if s.name == "feed:x")
    assert (feed.healthy, feed.consecutive_failures, feed.last_error) == (False, 1, "HTTP 500")


def test_fact_detail_lists_every_arrival_and_commit(session: Session) -> None:
    (a,) = add(session, fact(), source="inbox")
    add(session, fact(), source="feed:y")
    version = commit(session, a)
    commits.revert_to(session=session, to_version=0, reason="test", requested_by="t")
    work.requeue(session=session, fact_ids=[a])
    again = commit(session, a)
    detail = fact_detail(session, a)
    assert [o.source for o in detail.origins] == ["inbox", "feed:y"]
    assert detail.commit_history == (version, again) and detail.commit_version == again
    # a requeue gives the fact a fresh retry budget (issue 23, item 6): one claim since
    assert detail.status == "committed" and detail.attempts == 1
    assert commit_detail(session, version).reverted_by == list_reverts(session)[0].id
    with pytest.raises(UnknownFact):
        fact_detail(session, 12345)
    with pytest.raises(UnknownVersion):
        commit_detail(session, 99)


def test_find_facts_filters_and_unknown_source(session: Session) -> None:
    ids = add(session, fact("a", "1"), fact("b", "2"), fact("c", "3"))
    commit(session, ids[1])
    assert [r.id for r in find_facts(session, status=FactStatus.PENDING)] == [ids[0], ids[2]]
    assert [r.id for r in find_facts(session, source="inbox", limit=1)] == [ids[0]]
    with pytest.raises(UnknownSource, match="known: inbox"):
        find_facts(session, source="nope")


def test_facts_carry_their_last_error_and_its_cause(session: Session) -> None:
    missed, raised, fresh = add(session, fact("a", "1"), fact("b", "2"), fact("c", "3"))
    states.transition(session=session, fact_ids=[missed, raised], to=FactStatus.EDITING)
    why = "efficacy 0.250 < min_efficacy 0.9; out of retries after 3 tries"
    states.transition(
        session=session, fact_ids=[missed], to=FactStatus.FAILED, error=why, failure_cause=FailureCause.EFFICACY
    )
    states.transition(
        session=session, fact_ids=[raised], to=FactStatus.PENDING, error="the edit raised", failure_cause=FailureCause.ERROR
    )
    rows = {r.id: r for r in find_facts(session)}
    assert (rows[missed].last_error, rows[missed].failure_cause) == (why, "efficacy")
    assert (rows[fresh].last_error, rows[fresh].failure_cause) == (None, None)
    assert fact_detail(session, missed).failure_cause == "efficacy"
    assert pending_failure_causes(session, 5) == [FailureCause.ERROR, None]  # in claim order: by id


def test_the_gate_scores_of_a_commit(session: Session) -> None:
    (a,) = add(session, fact())
    version = commit(session, a)
    assert commit_gate_scores(session, version) is None
    for passed, agreement in ((False, 0.1), (True, 0.8)):
        commits.record_probe_run(
            session=session, kind=ProbeKind.GATE, scores={"agreement": agreement}, passed=passed, commit_version=version
        )
    assert commit_gate_scores(session, version) == {"agreement": 0.8}


def test_export_writes_the_ingest_format(session: Session) -> None:
    observed = datetime(2026, 11, 21, 10, 0, 5, 123, tzinfo=UTC)
    add(session, fact(external_id="x-1", observed_at=observed), fact("q", "r"))
    records = list(export_facts(session))
    assert records[0] == {
        "prompt": "The capital of France is",
        "target_new": "Lyon",
        "id": "x-1",
        "observed_at": "2026-11-21T10:00:05.000123Z",
    }
    assert records[1]["id"].startswith("ledger:")
    assert list(export_facts(session, status=FactStatus.COMMITTED)) == []
