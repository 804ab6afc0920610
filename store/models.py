"""The ledger's tables as SQLAlchemy 2 typed mappings.

Tables: `sources` (poll state and health), `facts` (normalised fact, status, supersession, the commit
that applied it), `fact_origins` (every arrival of a fact: provenance), `commits` (one row per
committed edit, with everything needed to check and reproduce it), `commit_facts` (which facts each
commit applied, kept even after a revert), `rejections` (input records that never became facts),
`probe_runs`, `reverts`, `pauses` and `reviews` (the audit trail). Constraint names follow `NAMING_CONVENTION`,
so migrations can refer to them on every back-end.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class FactStatus(enum.StrEnum):
    """Where a fact is in its life; `store.states.transition` is the only way to change it."""

    PENDING = "pending"  #: waiting to be edited into the model
    EDITING = "editing"  #: claimed by the edit loop; back to pending on restart if it crashed
    COMMITTED = "committed"  #: applied to the live weights by a commit
    REJECTED = "rejected"  #: the gate refused the edit (it harms specificity on its own); requeue to try again
    FAILED = "failed"  #: the edit loop gave up on it, `failure_cause` says why; requeue to try again
    REVERTED = "reverted"  #: was committed, then removed by a revert; requeue to re-apply
    SUPERSEDED = "superseded"  #: replaced by a newer target for the same prompt
    HELD = "held"  #: waiting for review or for its source's limits (`hold_reason`); never edited while held


class HoldReason(enum.StrEnum):
    """Why a fact is held instead of pending (docs/trust.md); stored with a sentence in `last_error`."""

    REVIEW = "review"  #: its source's policy is `review`: a person approves or rejects it
    PROTECTED = "protected"  #: its prompt is one of the protected facts: a person decides
    CONFLICT = "conflict"  #: a pending fact from a more trusted source disagrees on the same prompt
    RATE_LIMIT = "rate_limit"  #: its source sent more than `max_facts_per_hour`; released when under again
    PENDING_LIMIT = "pending_limit"  #: its source has `max_pending` facts waiting; released when under again


class ReviewAction(enum.StrEnum):
    """What a `reviews` row records."""

    APPROVED = "approved"  #: a person approved a held fact: it went to pending
    REJECTED = "rejected"  #: a person rejected a held fact
    RELEASED = "released"  #: the daemon released a fact held by a limit, its source being under it again


class FailureCause(enum.StrEnum):
    """Which part of the edit loop turned a fact's last try down; stored with its `last_error`."""

    EFFICACY = "efficacy"  #: the edit did not reach `[gate] min_efficacy` on the fact's prompt
    SPECIFICITY = "specificity"  #: the edit reached efficacy, but the gate's drift budgets had no room for it
    ERROR = "error"  #: the edit raised an error (a bug or a resource problem, not the fact's doing)


class ProbeKind(enum.StrEnum):
    """What a `probe_runs` row measured."""

    GATE = "gate"  #: the per-batch check of one edit batch (passed: the batch committed)
    PERIODIC = "periodic"  #: the periodic probes of the live model (passed: no drift past the thresholds)
    BASELINE = "baseline"  #: the probes of the base model, once per start


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every back-end (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to the ledger; use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (the only clock the ledger uses)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class Source(Base):
    """A configured fact source and its poll state. `name` is the key used in `Origin.source`."""

    __tablename__ = "sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(40))
    location: Mapped[str] = mapped_column(Text)
    etag: Mapped[str | None] = mapped_column(Text)
    last_modified: Mapped[str | None] = mapped_column(Text)
    cursor: Mapped[str | None] = mapped_column(Text)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_polled_at: Mapped[datetime | None]
    last_success_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    @property
    def healthy(self) -> bool:
        """True while the last poll succeeded (or none has failed yet)."""
        return self.consecutive_failures == 0


def _values_of(enum_class: type[enum.StrEnum], name: str) -> Enum:
    """A column type holding the values of `enum_class` as strings, checked by a constraint named `name`."""
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


_fact_status = _values_of(FactStatus, "fact_status")
_failure_cause = _values_of(FailureCause, "failure_cause")
_hold_reason = _values_of(HoldReason, "hold_reason")
_review_action = _values_of(ReviewAction, "review_action")
_review_hold_reason = _values_of(HoldReason, "hold_reason")  # one type object per table: each holds its CHECK


class Fact(Base):
    """One fact (a normalised prompt -> target_new edit) and where it is in its life.

    `source_id`, `origin_location` and `origin_position` describe the first arrival; every arrival,
    the first included, is a `FactOrigin` row. `last_error` says why its last try did not commit it
    (rejected, failed, or sent back for another try) and `failure_cause` which check that was. A held
    fact has its `hold_reason`, and `last_error` says it in words. `queued_at` is when it last entered
    the edit queue from intake, an approval or a release (the per-source hourly limit counts these).
    """

    __tablename__ = "facts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    target_new: Mapped[str] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    ground_truth: Mapped[str | None] = mapped_column(Text)
    rephrase_prompts: Mapped[list[Any]]
    locality: Mapped[list[Any]]  # [{"prompt": ..., "answer": ...}, ...]
    # Not indexed: equal content implies an equal prompt, so dedup looks facts up by prompt_hash alone,
    # and every random-key index costs about as much as the rest of an insert (bench/ledger.py).
    content_hash: Mapped[str] = mapped_column(String(64))
    prompt_hash: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[FactStatus] = mapped_column(_fact_status, default=FactStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    failure_cause: Mapped[FailureCause | None] = mapped_column(_failure_cause)
    hold_reason: Mapped[HoldReason | None] = mapped_column(_hold_reason)
    queued_at: Mapped[datetime | None]
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))  # queries by source use fact_origins
    origin_location: Mapped[str] = mapped_column(Text)
    origin_position: Mapped[str | None] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(Text)
    observed_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utc_now)
    status_changed_at: Mapped[datetime] = mapped_column(default=utc_now)
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("facts.id"))
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("facts.id"))
    commit_version: Mapped[int | None] = mapped_column(ForeignKey("commits.version"), index=True)


class FactOrigin(Base):
    """One arrival of a fact: which source, where in it, and when. Duplicates add rows here only."""

    __tablename__ = "fact_origins"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), index=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    location: Mapped[str] = mapped_column(Text)
    position: Mapped[str | None] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(Text)
    observed_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utc_now)


class Commit(Base):
    """A committed edit: version N applied `facts` on top of `parent_version` (0 is the base model)."""

    __tablename__ = "commits"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_version: Mapped[int] = mapped_column(Integer)  # 0 = the unedited base model
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    fact_count: Mapped[int] = mapped_column(Integer)
    gate_verdict: Mapped[str] = mapped_column(String(40))
    edit_metrics: Mapped[dict[str, Any]]
    probe_scores: Mapped[dict[str, Any]]
    artefact_path: Mapped[str | None] = mapped_column(Text)
    artefact_sha256: Mapped[str | None] = mapped_column(String(64))
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    model_fingerprint: Mapped[str | None] = mapped_column(Text)
    editor_version: Mapped[str | None] = mapped_column(Text)
    config_hash: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int | None] = mapped_column(Integer)
    package_versions: Mapped[dict[str, Any]]
    reverted_by_id: Mapped[int | None] = mapped_column(ForeignKey("reverts.id"))


class CommitFact(Base):
    """A fact applied by a commit. Kept after a revert, so history survives requeue and re-commit."""

    __tablename__ = "commit_facts"

    commit_version: Mapped[int] = mapped_column(ForeignKey("commits.version"), primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), primary_key=True, index=True)


class Rejection(Base):
    """An input record that never became a fact: its origin, an excerpt and the precise reason."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"), index=True)
    location: Mapped[str] = mapped_column(Text)
    position: Mapped[str | None] = mapped_column(Text)
    excerpt: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utc_now)


class ProbeRun(Base):
    """One run of the probes (gate or periodic), optionally tied to the commit it judged."""

    __tablename__ = "probe_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))  # a ProbeKind
    commit_version: Mapped[int | None] = mapped_column(ForeignKey("commits.version"), index=True)
    started_at: Mapped[datetime] = mapped_column(default=utc_now)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    passed: Mapped[bool | None] = mapped_column(Boolean(create_constraint=True, name="passed"))
    scores: Mapped[dict[str, Any]]
    details: Mapped[dict[str, Any]]


class Revert(Base):
    """The audit row of one revert: when, from which version to which, why and who asked."""

    __tablename__ = "reverts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    requested_at: Mapped[datetime] = mapped_column(default=utc_now)
    from_version: Mapped[int] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(Text)
    reverted_commits: Mapped[int] = mapped_column(Integer)
    reverted_facts: Mapped[int] = mapped_column(Integer)
    weights_restored_at: Mapped[datetime | None]  # set by the model-state work once weights match


class Pause(Base):
    """Editing paused by the daemon (drift, a blocked gate, a failed revert), and when and by what it resumed.

    A pause with no `resumed_at` is in force; it survives restarts until a revert, a resume, or a start
    under another configuration (`config_hash`) ends it.
    """

    __tablename__ = "pauses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    paused_at: Mapped[datetime] = mapped_column(default=utc_now)
    reason: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)  # the live version when editing paused
    config_hash: Mapped[str | None] = mapped_column(String(64))  # of the settings that shape an edit
    resumed_at: Mapped[datetime | None]
    resumed_by: Mapped[str | None] = mapped_column(Text)


class Review(Base):
    """The audit row of one decision on a held fact: approved, rejected (by whom, why) or released by the daemon."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fact_id: Mapped[int] = mapped_column(ForeignKey("facts.id"), index=True)
    action: Mapped[ReviewAction] = mapped_column(_review_action)
    hold_reason: Mapped[HoldReason | None] = mapped_column(_review_hold_reason)  #: why the fact was held
    reviewer: Mapped[str] = mapped_column(Text)  #: "cli:alice", "api:ops-bot", "daemon:limits"
    reason: Mapped[str | None] = mapped_column(Text)
    decided_at: Mapped[datetime] = mapped_column(default=utc_now)


Index("ix_facts_status_id", Fact.status, Fact.id)
