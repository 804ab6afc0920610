"""Read-only ledger queries behind `python -m daemon.ledger` (and later the HTTP API).

Results are plain frozen dataclasses, detached from the session, so callers can print or serialise
them after the transaction ends. "By source" means by any source the fact arrived from: a fact
that came from two sources counts under both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import Session

from store.commits import current_version
from store.errors import UnknownFact, UnknownSource, UnknownVersion
from store.models import (
    Commit,
    CommitFact,
    Fact,
    FactOrigin,
    FactStatus,
    FailureCause,
    ProbeKind,
    ProbeRun,
    Rejection,
    Revert,
    Review,
    Source,
)


@dataclass(frozen=True)
class SourceView:
    name: str
    kind: str
    location: str
    healthy: bool
    consecutive_failures: int
    last_error: str | None
    last_success_at: datetime | None
    last_polled_at: datetime | None


@dataclass(frozen=True)
class CommitView:
    version: int
    parent_version: int
    created_at: datetime
    fact_count: int
    gate_verdict: str
    reverted_by: int | None  #: id of the revert that undid this commit
    edit_metrics: dict[str, Any]
    probe_scores: dict[str, Any]
    artefact_path: str | None
    artefact_sha256: str | None
    weights_sha256: str | None
    model_fingerprint: str | None
    editor_version: str | None
    config_hash: str | None
    seed: int | None
    package_versions: dict[str, Any]
    fact_ids: tuple[int, ...]


@dataclass(frozen=True)
class RevertView:
    id: int
    requested_at: datetime
    from_version: int
    to_version: int
    reason: str | None
    requested_by: str
    reverted_commits: int
    reverted_facts: int


@dataclass(frozen=True)
class StatusSummary:
    by_status: dict[str, int]  #: every status, zero included
    by_source: dict[str, dict[str, int]]  #: source name -> status -> count (non-zero only)
    current_version: int
    last_commit: CommitView | None
    rejections: int
    sources: tuple[SourceView, ...]


@dataclass(frozen=True)
class FactRow:
    id: int
    status: str
    prompt: str
    target_new: str
    source: str  #: the source it first arrived from
    attempts: int
    commit_version: int | None
    received_at: datetime
    last_error: str | None  #: why its last try did not commit it
    failure_cause: str | None  #: which check that was (a `FailureCause`)
    hold_reason: str | None = None  #: why it is held (a `HoldReason`), while it is


@dataclass(frozen=True)
class ReviewView:
    """One decision on a held fact (the review audit trail)."""

    action: str  #: approved, rejected or released
    reviewer: str
    reason: str | None
    hold_reason: str | None  #: why the fact had been held
    decided_at: datetime


@dataclass(frozen=True)
class OriginView:
    source: str
    location: str
    position: str | None
    external_id: str | None
    observed_at: datetime | None
    received_at: datetime


@dataclass(frozen=True)
class FactView:
    id: int
    status: str
    prompt: str
    target_new: str
    subject: str | None
    ground_truth: str | None
    rephrase_prompts: tuple[str, ...]
    locality: tuple[dict[str, str], ...]
    content_hash: str
    attempts: int
    last_error: str | None
    failure_cause: str | None  #: efficacy, specificity or error: which check turned its last try down
    received_at: datetime
    status_changed_at: datetime
    observed_at: datetime | None
    external_id: str | None
    supersedes: int | None
    superseded_by: int | None
    commit_version: int | None
    commit_history: tuple[int, ...]  #: every commit that applied it, oldest first
    origins: tuple[OriginView, ...]  #: every arrival, oldest first
    hold_reason: str | None = None  #: why it is held (a `HoldReason`), while it is
    reviews: tuple[ReviewView, ...] = ()  #: every approval, rejection or release, oldest first


def status_summary(session: Session) -> StatusSummary:
    """Counts by status and by source, the current version, the last commit, rejections, source health."""
    by_status = {status.value: 0 for status in FactStatus}
    for status, count in session.execute(select(Fact.status, func.count()).group_by(Fact.status)):
        by_status[status.value] = count
    by_source: dict[str, dict[str, int]] = {}
    query = (
        select(Source.name, Fact.status, func.count(func.distinct(Fact.id)))
        .join(FactOrigin, FactOrigin.source_id == Source.id)
        .join(Fact, Fact.id == FactOrigin.fact_id)
        .group_by(Source.name, Fact.status)
    )
    for name, status, count in session.execute(query):
        by_source.setdefault(name, {})[status.value] = count
    last = session.scalars(select(Commit).order_by(Commit.version.desc()).limit(1)).first()
    sources = tuple(_source_view(s) for s in session.scalars(select(Source).order_by(Source.name)))
    return StatusSummary(
        by_status=by_status,
        by_source=by_source,
        current_version=current_version(session),
        last_commit=_commit_view(session, last) if last else None,
        rejections=session.scalar(select(func.count()).select_from(Rejection)) or 0,
        sources=sources,
    )


def list_commits(session: Session, limit: int | None = None) -> list[CommitView]:
    """Commits newest first, reverted ones included (their `reverted_by` is set)."""
    query = select(Commit).order_by(Commit.version.desc()).limit(limit)
    return [_commit_view(session, commit) for commit in session.scalars(query)]


def list_reverts(session: Session) -> list[RevertView]:
    """The revert audit trail, newest first."""
    query = select(Revert).order_by(Revert.id.desc())
    return [
        RevertView(
            id=r.id,
            requested_at=r.requested_at,
            from_version=r.from_version,
            to_version=r.to_version,
            reason=r.reason,
            requested_by=r.requested_by,
            reverted_commits=r.reverted_commits,
            reverted_facts=r.reverted_facts,
        )
        for r in session.scalars(query)
    ]


def commit_detail(session: Session, version: int) -> CommitView:
    """One commit; raises UnknownVersion."""
    commit = session.get(Commit, version)
    if commit is None:
        raise UnknownVersion(f"no commit with version {version} in the ledger (see `log`)")
    return _commit_view(session, commit)


def fact_detail(session: Session, fact_id: int) -> FactView:
    """One fact with every arrival and every commit that applied it; raises UnknownFact."""
    fact = session.get(Fact, fact_id)
    if fact is None:
        raise UnknownFact(f"no fact with id {fact_id} in the ledger (see `facts`)")
    origins = session.execute(
        select(FactOrigin, Source.name)
        .join(Source, Source.id == FactOrigin.source_id)
        .where(FactOrigin.fact_id == fact_id)
        .order_by(FactOrigin.id)
    )
    history = session.scalars(
        select(CommitFact.commit_version).where(CommitFact.fact_id == fact_id).order_by(CommitFact.commit_version)
    )
    reviews = session.scalars(select(Review).where(Review.fact_id == fact_id).order_by(Review.id))
    return FactView(
        id=fact.id,
        status=fact.status.value,
        prompt=fact.prompt,
        target_new=fact.target_new,
        subject=fact.subject,
        ground_truth=fact.ground_truth,
        rephrase_prompts=tuple(fact.rephrase_prompts),
        locality=tuple(fact.locality),
        content_hash=fact.content_hash,
        attempts=fact.attempts,
        last_error=fact.last_error,
        failure_cause=fact.failure_cause,
        received_at=fact.received_at,
        status_changed_at=fact.status_changed_at,
        observed_at=fact.observed_at,
        external_id=fact.external_id,
        supersedes=fact.supersedes_id,
        superseded_by=fact.superseded_by_id,
        commit_version=fact.commit_version,
        commit_history=tuple(history),
        origins=tuple(
            OriginView(name, o.location, o.position, o.external_id, o.observed_at, o.received_at) for o, name in origins
        ),
        hold_reason=fact.hold_reason.value if fact.hold_reason else None,
        reviews=tuple(
            ReviewView(
                r.action.value, r.reviewer, r.reason, r.hold_reason.value if r.hold_reason else None, r.decided_at
            )
            for r in reviews
        ),
    )


def find_facts(
    session: Session, *, status: FactStatus | None = None, source: str | None = None, limit: int | None = None
) -> list[FactRow]:
    """Facts in id order, optionally only one status and/or one source; raises UnknownSource."""
    query = (
        select(Fact.id, Fact.status, Fact.prompt, Fact.target_new, Source.name, Fact.attempts)
        .add_columns(Fact.commit_version, Fact.received_at, Fact.last_error, Fact.failure_cause, Fact.hold_reason)
        .join(Source, Source.id == Fact.source_id)
        .order_by(Fact.id)
        .limit(limit)
    )
    query = _filtered(session, query, status, source)
    rows = []
    for row in session.execute(query):
        fid, status, prompt, target, source, attempts, version, received, error, cause, held = row
        rows.append(
            FactRow(fid, status.value, prompt, target, source, attempts, version, received, error, cause,
                    held.value if held else None)
        )
    return rows


def pending_failure_causes(session: Session, limit: int) -> list[FailureCause | None]:
    """The failure cause of the `limit` pending facts `store.work.claim_pending` takes next, in its order (by id)."""
    query = select(Fact.failure_cause).where(Fact.status == FactStatus.PENDING).order_by(Fact.id).limit(limit)
    return list(session.scalars(query))


def commit_gate_scores(session: Session, version: int) -> dict[str, Any] | None:
    """The scores of the gate run that passed the commit of `version` (None: none recorded)."""
    query = (
        select(ProbeRun.scores)
        .where(ProbeRun.kind == ProbeKind.GATE, ProbeRun.commit_version == version, ProbeRun.passed.is_(True))
        .order_by(ProbeRun.id.desc())
        .limit(1)
    )
    scores = session.scalars(query).first()
    return dict(scores) if scores is not None else None


def export_facts(
    session: Session, *, status: FactStatus | None = None, source: str | None = None
) -> Iterator[dict[str, Any]]:
    """Facts as ingest-format records (the JSONL `python -m daemon.ledger export` writes), in id order.

    `id` is the record's external id when it had one, else `ledger:<fact id>`.
    """
    query = _filtered(session, select(Fact).order_by(Fact.id), status, source)
    for fact in session.scalars(query.execution_options(yield_per=1000)):
        record: dict[str, Any] = {"prompt": fact.prompt, "target_new": fact.target_new}
        if fact.subject is not None:
            record["subject"] = fact.subject
        if fact.ground_truth is not None:
            record["ground_truth"] = fact.ground_truth
        if fact.rephrase_prompts:
            record["rephrase_prompts"] = list(fact.rephrase_prompts)
        if fact.locality:
            record["locality"] = [dict(item) for item in fact.locality]
        record["id"] = fact.external_id or f"ledger:{fact.id}"
        if fact.observed_at is not None:
            record["observed_at"] = fact.observed_at.isoformat().replace("+00:00", "Z")  # lossless
        yield record


def _filtered(session: Session, query: Select[Any], status: FactStatus | None, source: str | None) -> Select[Any]:
    if status is not None:
        query = query.where(Fact.status == status)
    if source is not None:
        source_id = session.scalar(select(Source.id).where(Source.name == source))
        if source_id is None:
            known = ", ".join(session.scalars(select(Source.name).order_by(Source.name))) or "none yet"
            raise UnknownSource(f"no source named {source!r} in the ledger (known: {known})")
        arrived = exists().where(FactOrigin.fact_id == Fact.id, FactOrigin.source_id == source_id)
        query = query.where(arrived)
    return query


def _source_view(source: Source) -> SourceView:
    return SourceView(
        name=source.name,
        kind=source.kind,
        location=source.location,
        healthy=source.healthy,
        consecutive_failures=source.consecutive_failures,
        last_error=source.last_error,
        last_success_at=source.last_success_at,
        last_polled_at=source.last_polled_at,
    )


def _commit_view(session: Session, commit: Commit) -> CommitView:
    fact_ids = session.scalars(
        select(CommitFact.fact_id).where(CommitFact.commit_version == commit.version).order_by(CommitFact.fact_id)
    )
    return CommitView(
        version=commit.version,
        parent_version=commit.parent_version,
        created_at=commit.created_at,
        fact_count=commit.fact_count,
        gate_verdict=commit.gate_verdict,
        reverted_by=commit.reverted_by_id,
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
        fact_ids=tuple(fact_ids),
    )
