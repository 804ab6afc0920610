"""record_commit, probe runs and reverts: versions, parents, fact states and the audit row."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from store import commits, work
from store.errors import IllegalTransition, LedgerError, UnknownVersion
from store.models import Commit, CommitFact, Fact, FactStatus, ProbeRun, Revert
from store.records import CommitIn
from tests.store.factories import add, commit, fact, status_of


def test_record_commit_stores_everything_and_commits_facts(session: Session) -> None:
    ids = add(session, fact("a", "1"), fact("b", "2"))
    work.claim_pending(session=session, limit=2)
    record = CommitIn(
        fact_ids=tuple(ids),
        gate_verdict="passed",
        edit_metrics={"efficacy": 1.0, "seconds": 2.5},
        probe_scores={"sst2": 0.91},
        artefact_path="artefacts/v1.safetensors",
        artefact_sha256="a" * 64,
        weights_sha256="b" * 64,
        model_fingerprint="smollm2-135m:abc",
        editor_version="emsedit-0.1",
        config_hash="c" * 64,
        seed=7,
        package_versions={"torch": "2.13.0"},
    )
    row = commits.record_commit(session=session, commit=record)
    assert (row.version, row.parent_version, row.fact_count) == (1, 0, 2)
    stored = session.get(Commit, 1)
    assert stored is not None
    assert stored.edit_metrics == {"efficacy": 1.0, "seconds": 2.5} and stored.package_versions == {"torch": "2.13.0"}
    assert (stored.weights_sha256, stored.seed, stored.reverted_by_id) == ("b" * 64, 7, None)
    assert sorted(session.scalars(select(CommitFact.fact_id))) == ids
    facts = session.scalars(select(Fact).order_by(Fact.id)).all()
    assert [(f.status, f.commit_version) for f in facts] == [(FactStatus.COMMITTED, 1)] * 2
    assert commits.current_version(session) == 1


def test_versions_chain_through_parents(session: Session) -> None:
    a, b = add(session, fact("a", "1"), fact("b", "2"))
    assert commit(session, a) == 1
    assert commit(session, b) == 2
    parents = session.execute(select(Commit.version, Commit.parent_version).order_by(Commit.version)).all()
    assert [tuple(p) for p in parents] == [(1, 0), (2, 1)]


def test_record_commit_refuses_facts_not_in_editing(session: Session) -> None:
    (fid,) = add(session, fact())
    with pytest.raises(IllegalTransition, match=f"fact {fid} is pending"):
        commits.record_commit(session=session, commit=CommitIn(fact_ids=(fid,)))
    with pytest.raises(LedgerError, match="at least one fact"):
        commits.record_commit(session=session, commit=CommitIn(fact_ids=()))


def test_probe_run_recorded_against_commit(session: Session) -> None:
    (fid,) = add(session, fact())
    version = commit(session, fid)
    run = commits.record_probe_run(
        session=session,
        kind="gate",
        scores={"mmlu": 0.4},
        passed=True,
        commit_version=version,
        duration_seconds=3.0,
    )
    stored = session.get(ProbeRun, run.id)
    assert stored is not None
    assert (stored.kind, stored.scores, stored.passed, stored.commit_version) == (
        "gate",
        {"mmlu": 0.4},
        True,
        1,
    )


def test_revert_to_marks_commits_and_facts_and_writes_audit_row(session: Session) -> None:
    a, b, c = add(session, fact("a", "1"), fact("b", "2"), fact("c", "3"))
    for fid in (a, b, c):
        commit(session, fid)
    audit = commits.revert_to(session=session, to_version=1, reason="bad probe scores", requested_by="alice")
    assert (audit.from_version, audit.to_version, audit.reverted_commits, audit.reverted_facts) == (
        3,
        1,
        2,
        2,
    )
    assert (audit.reason, audit.requested_by, audit.weights_restored_at) == (
        "bad probe scores",
        "alice",
        None,
    )
    assert [status_of(session, i) for i in (a, b, c)] == [FactStatus.COMMITTED] + [FactStatus.REVERTED] * 2
    reverted = session.scalars(select(Commit.version).where(Commit.reverted_by_id == audit.id))
    assert sorted(reverted) == [2, 3]
    assert commits.current_version(session) == 1
    (d,) = add(session, fact("d", "4"))
    assert commit(session, d) == 4
    newest = session.get(Commit, 4)
    assert newest is not None and newest.parent_version == 1


def test_revert_restores_fact_superseded_by_a_reverted_one(session: Session) -> None:
    (old,) = add(session, fact(target="Lyon"))
    commit(session, old)
    (new,) = add(session, fact(target="Marseille"))
    commit(session, new)
    assert status_of(session, old) is FactStatus.SUPERSEDED
    commits.revert_last(session=session, count=1, reason=None, requested_by="cli")
    assert status_of(session, new) is FactStatus.REVERTED
    assert status_of(session, old) is FactStatus.COMMITTED
    row = session.get(Fact, old)
    assert row is not None and row.superseded_by_id is None


def test_revert_below_both_reverts_superseded_fact_too(session: Session) -> None:
    (old,) = add(session, fact(target="Lyon"))
    commit(session, old)
    (new,) = add(session, fact(target="Marseille"))
    commit(session, new)
    audit = commits.revert_to(session=session, to_version=0, reason=None, requested_by="cli")
    assert audit.reverted_facts == 2
    assert {status_of(session, old), status_of(session, new)} == {FactStatus.REVERTED}
    assert commits.current_version(session) == 0


def test_requeued_then_superseded_fact_is_not_restored_by_later_revert(session: Session) -> None:
    (a,) = add(session, fact(target="A"))
    commit(session, a)
    commits.revert_last(session=session, count=1, reason=None, requested_by="t")
    work.requeue(session=session, fact_ids=[a])
    (b,) = add(session, fact(target="B"))  # supersedes the requeued, pending a
    (c,) = add(session, fact("other", "x"))
    commit(session, c)
    commit(session, b)
    commits.revert_to(session=session, to_version=2, reason=None, requested_by="t")
    assert status_of(session, a) is FactStatus.SUPERSEDED
    assert status_of(session, b) is FactStatus.REVERTED


def test_revert_last_walks_the_active_chain(session: Session) -> None:
    ids = add(session, *(fact(f"p{i}", "t") for i in range(4)))
    for fid in ids[:3]:
        commit(session, fid)
    commits.revert_last(session=session, count=1, reason=None, requested_by="t")  # 3 reverted
    commit(session, ids[3])  # version 4, parent 2
    audit = commits.revert_last(session=session, count=2, reason=None, requested_by="t")
    assert (audit.from_version, audit.to_version) == (4, 1)
    assert session.scalars(select(Revert).order_by(Revert.id)).all()[0].to_version == 2


@pytest.mark.parametrize(
    ("target", "message"),
    [(2, "already at version 2"), (5, "choose one from 0 to 1"), (-1, "choose one from 0 to 1")],
)
def test_revert_to_bad_target(session: Session, target: int, message: str) -> None:
    for fid in add(session, fact("a", "1"), fact("b", "2")):
        commit(session, fid)
    with pytest.raises(UnknownVersion, match=message):
        commits.revert_to(session=session, to_version=target, reason=None, requested_by="t")


def test_revert_to_a_reverted_version_is_refused(session: Session) -> None:
    for fid in add(session, *(fact(f"p{i}", "t") for i in range(3))):
        commit(session, fid)
    commits.revert_to(session=session, to_version=1, reason=None, requested_by="t")
    (d,) = add(session, fact("d", "t"))
    commit(session, d)
    with pytest.raises(UnknownVersion, match="version 2 was itself reverted"):
        commits.revert_to(session=session, to_version=2, reason=None, requested_by="t")


def test_revert_last_bad_counts(session: Session) -> None:
    (a,) = add(session, fact())
    commit(session, a)
    with pytest.raises(UnknownVersion, match="only 1 are active"):
        commits.revert_last(session=session, count=2, reason=None, requested_by="t")
    with pytest.raises(UnknownVersion, match="at least 1"):
        commits.revert_last(session=session, count=0, reason=None, requested_by="t")


def test_reverts_wait_for_the_daemon_to_restore_weights(session: Session) -> None:
    (a,) = add(session, fact())
    commit(session, a)
    audit = commits.revert_last(session=session, count=1, reason=None, requested_by="t")
    assert [r.id for r in commits.unapplied_reverts(session)] == [audit.id]
    applied = commits.mark_revert_applied(session=session, revert_id=audit.id)
    assert applied.weights_restored_at is not None
    assert commits.unapplied_reverts(session) == []
    with pytest.raises(LedgerError, match="no revert #99"):
        commits.mark_revert_applied(session=session, revert_id=99)
