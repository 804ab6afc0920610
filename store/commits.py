"""Commits, probe runs and reverts in the ledger.

Versions are whole numbers; 0 is the unedited base model. Every commit records its parent (the
version it was applied on top of). The commits not reverted always form one chain from the current
version down to 0, so "current version" is the highest version not reverted. A revert marks every
commit above the target as reverted and moves the facts accordingly (see `revert_to`); restoring the
weights is the model-state code's job, which sets `Revert.weights_restored_at` when it is done.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from store.db import serialise_writers
from store.errors import LedgerError, StaleVersion, UnknownVersion
from store.models import Commit, CommitFact, Fact, FactStatus, ProbeRun, Revert, utc_now
from store.records import CommitIn
from store.states import chunks, transition


def current_version(session: Session) -> int:
    """The version the live weights should be at: the newest commit not reverted, or 0."""
    return session.scalar(select(func.max(Commit.version)).where(Commit.reverted_by_id.is_(None))) or 0


def active_versions(session: Session) -> list[int]:
    """The versions not reverted, newest first (the chain from the current version down)."""
    query = select(Commit.version).where(Commit.reverted_by_id.is_(None)).order_by(Commit.version.desc())
    return list(session.scalars(query))


def next_version(session: Session) -> int:
    """The version `record_commit` will give the next commit: one above the highest ever used (reverted too).

    The model-state code names the commit's artefact with it before the ledger transaction; only the
    edit loop (one writer of the model) records commits, so it cannot change in between, and
    `record_commit(expected_version=...)` refuses the commit if it did.
    """
    return (session.scalar(select(func.max(Commit.version))) or 0) + 1


def commit_parents(session: Session) -> dict[int, tuple[int, str | None, str | None]]:
    """Every commit, reverted ones included: version -> (parent, artefact sha256, weights sha256)."""
    rows = session.execute(select(Commit.version, Commit.parent_version, Commit.artefact_sha256, Commit.weights_sha256))
    return {version: (parent, artefact, weights) for version, parent, artefact, weights in rows}


def record_commit(
    *, session: Session, commit: CommitIn, expected_version: int | None = None, expected_parent: int | None = None
) -> Commit:
    """Record a commit and move its facts from `editing` to `committed`, in the caller's transaction.

    The new version is one above the highest ever used (reverted ones included) and its parent is
    the current version. Committed facts with the same prompt and another target are superseded by
    the new fact. Raises IllegalTransition if a fact is not in `editing`, and StaleVersion when
    `expected_version` / `expected_parent` (what the caller's artefact was made for) differ from what
    the ledger would record, e.g. because a revert landed meanwhile; the caller then rolls back.
    """
    ids = list(dict.fromkeys(commit.fact_ids))
    if not ids:
        raise LedgerError("a commit needs at least one fact")
    serialise_writers(session)  # versions are max + 1: no two writers may pick one at once
    parent = current_version(session)
    version = next_version(session)
    if expected_version is not None and expected_version != version:
        raise StaleVersion(f"the commit was prepared as version {expected_version}, but the next version is {version}")
    if expected_parent is not None and expected_parent != parent:
        raise StaleVersion(
            f"the commit was prepared on version {expected_parent}, but the ledger's current version is {parent} "
            "(a revert landed meanwhile)"
        )
    row = Commit(
        version=version,
        parent_version=parent,
        fact_count=len(ids),
        gate_verdict=commit.gate_verdict,
        edit_metrics=dict(commit.edit_metrics),
        probe_scores=dict(commit.probe_scores),
        artefact_path=commit.artefact_path,
        artefact_sha256=commit.artefact_sha256,
        weights_sha256=commit.weights_sha256,
        model_fingerprint=commit.model_fingerprint,
        editor_version=commit.editor_version,
        config_hash=commit.config_hash,
        seed=commit.seed,
        package_versions=dict(commit.package_versions),
    )
    session.add(row)
    session.flush()
    transition(session=session, fact_ids=ids, to=FactStatus.COMMITTED, commit_version=version)
    session.execute(insert(CommitFact), [{"commit_version": version, "fact_id": fid} for fid in ids])
    _supersede_committed(session, ids)
    return row


def _supersede_committed(session: Session, new_ids: list[int]) -> None:
    newer_for_prompt: dict[str, int] = {}
    for part in chunks(new_ids):
        rows = session.execute(select(Fact.id, Fact.prompt_hash).where(Fact.id.in_(part)))
        newer_for_prompt.update({phash: fid for fid, phash in rows})
    older: dict[int, list[int]] = {}
    fresh = set(new_ids)
    for part in chunks(list(newer_for_prompt)):
        query = select(Fact.id, Fact.prompt_hash).where(Fact.prompt_hash.in_(part), Fact.status == FactStatus.COMMITTED)
        for fid, phash in session.execute(query):
            if fid not in fresh:
                older.setdefault(newer_for_prompt[phash], []).append(fid)
    for newer, ids in older.items():
        transition(session=session, fact_ids=ids, to=FactStatus.SUPERSEDED, superseded_by=newer)


def record_probe_run(
    *,
    session: Session,
    kind: str,
    scores: Mapping[str, float],
    passed: bool | None,
    commit_version: int | None = None,
    duration_seconds: float | None = None,
    details: Mapping[str, Any] | None = None,
) -> ProbeRun:
    """Record one probe run ("gate", "periodic", "baseline"), optionally tied to a commit."""
    run = ProbeRun(
        kind=kind,
        scores=dict(scores),
        passed=passed,
        commit_version=commit_version,
        duration_seconds=duration_seconds,
        details=dict(details or {}),
    )
    session.add(run)
    session.flush()
    return run


def revert_to(*, session: Session, to_version: int, reason: str | None, requested_by: str) -> Revert:
    """Revert every commit above `to_version` (0 = the base model) and write the audit row.

    Facts of the reverted commits become `reverted` (also those superseded meanwhile); committed
    facts that had been superseded by a reverted fact, and whose own commit stays, become
    `committed` again, because the restored weights contain them. Raises UnknownVersion when
    `to_version` is not on the active chain or is the current version.
    """
    serialise_writers(session)
    current = current_version(session)
    check_revert_target(session, to_version, current)
    reverted = [v for v in active_versions(session) if v > to_version]
    audit = Revert(
        from_version=current,
        to_version=to_version,
        reason=reason,
        requested_by=requested_by,
        reverted_commits=len(reverted),
        reverted_facts=0,
    )
    session.add(audit)
    session.flush()
    for commit in session.scalars(select(Commit).where(Commit.version.in_(reverted))):
        commit.reverted_by_id = audit.id
    gone = list(
        session.scalars(
            select(Fact.id).where(
                Fact.commit_version.in_(reverted),
                Fact.status.in_((FactStatus.COMMITTED, FactStatus.SUPERSEDED)),
            )
        )
    )
    transition(session=session, fact_ids=gone, to=FactStatus.REVERTED)
    _restore_superseded(session, gone, to_version)
    audit.reverted_facts = len(gone)
    session.flush()
    return audit


def check_revert_target(session: Session, to_version: int, current: int | None = None) -> None:
    """Raise UnknownVersion unless `to_version` is an older version on the active chain."""
    if current is None:
        current = current_version(session)
    if to_version == current:
        raise UnknownVersion(f"the ledger is already at version {current}; nothing to revert")
    if to_version < 0 or to_version > current:
        raise UnknownVersion(f"cannot revert to version {to_version}: choose one from 0 to {current - 1}")
    if to_version == 0:
        return
    commit = session.get(Commit, to_version)
    if commit is None:
        raise UnknownVersion(f"no commit with version {to_version} in the ledger")
    if commit.reverted_by_id is not None:
        raise UnknownVersion(
            f"version {to_version} was itself reverted (revert #{commit.reverted_by_id}); "
            "revert to a version on the active chain (see `python -m daemon.ledger log`)"
        )


def _restore_superseded(session: Session, gone: list[int], to_version: int) -> None:
    restored: list[int] = []
    for part in chunks(gone):
        query = (
            select(Fact.id)
            .join(Commit, Commit.version == Fact.commit_version)
            .where(
                Fact.superseded_by_id.in_(part),
                Fact.status == FactStatus.SUPERSEDED,
                Commit.reverted_by_id.is_(None),
                Commit.version <= to_version,
            )
        )
        restored.extend(session.scalars(query))
    transition(session=session, fact_ids=restored, to=FactStatus.COMMITTED)


def revert_last(*, session: Session, count: int, reason: str | None, requested_by: str) -> Revert:
    """Revert the newest `count` active commits (see `revert_to`)."""
    chain = active_versions(session)
    if count < 1:
        raise UnknownVersion(f"--last needs a count of at least 1, got {count}")
    if count > len(chain):
        raise UnknownVersion(f"cannot revert the last {count} commits: only {len(chain)} are active")
    target = [*chain, 0][count]
    return revert_to(session=session, to_version=target, reason=reason, requested_by=requested_by)


def unapplied_reverts(session: Session) -> list[Revert]:
    """Reverts whose weights have not been restored yet, oldest first (the daemon applies these)."""
    return list(session.scalars(select(Revert).where(Revert.weights_restored_at.is_(None)).order_by(Revert.id)))


def mark_revert_applied(*, session: Session, revert_id: int) -> Revert:
    """Record that the live weights now match the revert's target version. Raises LedgerError."""
    audit = session.get(Revert, revert_id)
    if audit is None:
        raise LedgerError(f"no revert #{revert_id} in the ledger")
    if audit.weights_restored_at is None:
        audit.weights_restored_at = utc_now()
    return audit
