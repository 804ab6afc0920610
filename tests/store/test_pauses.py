"""Editing pauses in the ledger: one in force until resumed, and the reverts filed since it began."""

from __future__ import annotations

from sqlalchemy.orm import Session

from store import commits, pauses
from tests.store.factories import add, commit, fact


def test_a_pause_is_in_force_until_resumed(session: Session) -> None:
    assert pauses.current_pause(session) is None
    first = pauses.record_pause(session=session, reason="drift: flip rate 0.3", version=4, config_hash="a" * 64)
    assert pauses.record_pause(session=session, reason="drift: flip rate 0.3", version=4, config_hash="a" * 64) is first
    second = pauses.record_pause(session=session, reason="revert could not be applied", version=4, config_hash=None)
    assert pauses.current_pause(session) is second  # the newest reason is the one to show
    assert pauses.record_resume(session=session, resumed_by="revert 3") == 2
    assert pauses.current_pause(session) is None
    assert (first.resumed_by, second.resumed_by) == ("revert 3", "revert 3")
    assert first.resumed_at is not None and first.resumed_at >= first.paused_at
    assert pauses.record_resume(session=session, resumed_by="api:127.0.0.1") == 0


def test_the_reverts_filed_since_a_pause_began(session: Session) -> None:
    (a,) = add(session, fact("a", "1"))
    commit(session, a)
    before = commits.revert_to(session=session, to_version=0, reason="earlier", requested_by="t")
    pause = pauses.record_pause(session=session, reason="gate: blocked", version=0, config_hash=None)
    assert pauses.revert_since(session, pause) is None
    (b,) = add(session, fact("b", "2"))
    commit(session, b)
    after = commits.revert_to(session=session, to_version=0, reason="answer", requested_by="cli:t")
    assert before.id != after.id
    found = pauses.revert_since(session, pause)
    assert found is not None and found.id == after.id


def test_a_revert_filed_before_a_pause_but_carried_out_after_it_counts(session: Session) -> None:
    (a,) = add(session, fact())
    commit(session, a)
    revert = commits.revert_to(session=session, to_version=0, reason="x", requested_by="cli:t")
    pause = pauses.record_pause(session=session, reason="revert could not be applied: disk full", version=1, config_hash=None)
    assert pauses.revert_since(session, pause) is None
    commits.mark_revert_applied(session=session, revert_id=revert.id)  # recovery at the next start
    found = pauses.revert_since(session, pause)
    assert found is not None and found.id == revert.id
