"""The ledger-backed half of `daemon.service_view.ServiceView`: facts, commits, submissions, ledger status.

`LedgerView` turns `store.queries` results into the API's models and runs POST /v1/facts through
ingest's validation into the ledger, one short transaction per call. The service composes it with
the model-backed methods (readiness, query, revert) to implement the whole protocol.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.api_models import (
    CommitOut,
    FactDetail,
    FactSummary,
    LedgerStatus,
    RecordOrigin,
    RecordRejection,
    SourceStatus,
    SubmitSummary,
)
from daemon.metrics import Metrics
from daemon.rejection_codes import reason_code
from daemon.service_view import InvalidInput, NotFound, Unavailable
from ingest.config import IngestConfig
from ingest.documents import read_document
from ingest.errors import DocumentError
from ingest.facts import to_outcomes
from ingest.recording import split, switched_off
from ingest.scheduling import is_healthy
from ingest.trust import API_SOURCE, ProtectedFactsError, trust_rules
from store import intake, queries
from store.commits import current_version
from store.errors import InvalidFact, LedgerError, UnknownFact, UnknownSource
from store.models import FactStatus
from store.records import RejectionIn


def commit_out(view: queries.CommitView) -> CommitOut:
    """The API form of a commit."""
    return CommitOut.model_validate(asdict(view))


def fact_detail_out(view: queries.FactView) -> FactDetail:
    """The API form of one fact."""
    return FactDetail.model_validate(asdict(view))


def rejection_out(rejection: RejectionIn) -> RecordRejection:
    """The API form of a rejection, with its reason code."""
    origin = rejection.origin
    return RecordRejection(
        origin=RecordOrigin(source=origin.source, location=origin.location, position=origin.position),
        reason=rejection.reason,
        code=reason_code(rejection.reason),
    )


class LedgerView:
    """Ledger reads and fact submission for the API; thread-safe (a session per call)."""

    def __init__(self, sessions: sessionmaker[Session], ingest: IngestConfig, metrics: Metrics | None = None) -> None:
        self.sessions = sessions
        self.ingest = ingest
        self.metrics = metrics

    def list_facts(self, *, status: FactStatus | None, source: str | None, limit: int) -> list[FactSummary]:
        """Facts in id order (see ServiceView.list_facts)."""
        with self.sessions() as session:
            try:
                rows = queries.find_facts(session, status=status, source=source, limit=limit)
            except UnknownSource as exc:
                raise NotFound(str(exc)) from None
        return [FactSummary.model_validate(asdict(row)) for row in rows]

    def get_fact(self, fact_id: int) -> FactDetail:
        """One fact (see ServiceView.get_fact)."""
        with self.sessions() as session:
            try:
                return fact_detail_out(queries.fact_detail(session, fact_id))
            except UnknownFact as exc:
                raise NotFound(str(exc)) from None

    def list_commits(self, *, limit: int) -> list[CommitOut]:
        """Commits newest first (see ServiceView.list_commits)."""
        with self.sessions() as session:
            return [commit_out(c) for c in queries.list_commits(session, limit=limit)]

    def ledger_status(self) -> LedgerStatus:
        """Counts by status, the current version, the last commit, rejections and source health."""
        with self.sessions() as session:
            summary = queries.status_summary(session)
        return LedgerStatus(
            model_version=summary.current_version,
            facts=summary.by_status,
            rejections=summary.rejections,
            last_commit=commit_out(summary.last_commit) if summary.last_commit else None,
            sources=[SourceStatus.model_validate(self._source_fields(s)) for s in summary.sources],
        )

    def submit_facts(self, document: bytes, *, origin: str) -> SubmitSummary:
        """Validate and store a JSON document of facts (see ServiceView.submit_facts); counts it in the metrics."""
        try:
            records = read_document(document, name="request.json", limits=self.ingest.limits)
        except DocumentError as exc:
            raise InvalidInput(f"body: {exc}") from None
        outcomes = to_outcomes(records, source=API_SOURCE, location=origin, limits=self.ingest.limits)
        accepted, rejected = split(outcomes)
        try:
            rules = trust_rules(self.ingest)
        except ProtectedFactsError as exc:
            raise Unavailable(f"facts cannot be taken now: {exc}") from None
        accepted, off = switched_off(accepted, rules)
        rejected += off
        try:
            with self.sessions.begin() as session:
                intake.ensure_source(session=session, name=API_SOURCE, kind="api", location="POST /v1/facts")
                result = intake.add_facts(session=session, items=[(a.fact, a.origin) for a in accepted], rules=rules)
                intake.add_rejections(session=session, items=rejected)
        except InvalidFact as exc:
            raise InvalidInput(str(exc)) from None
        if self.metrics is not None:
            self.metrics.observe_ingest(
                API_SOURCE,
                accepted=result.accepted,
                duplicates=result.duplicates,
                rejection_reasons=[r.reason for r in rejected],
            )
            self.metrics.observe_held(API_SOURCE, result.held)
        return SubmitSummary(
            accepted=result.accepted,
            duplicates=result.duplicates,
            superseded=result.superseded,
            held=result.held,
            rejected=len(rejected),
            fact_ids=list(result.fact_ids),
            rejections=[rejection_out(r) for r in rejected],
        )

    def _source_fields(self, view: queries.SourceView) -> dict[str, Any]:
        fields = asdict(view)
        fields.pop("location", None)  # may hold credentials in a URL; not shown by the API
        # Health by the same threshold as the scheduler and the metrics, not the ledger's "no failure yet".
        fields["healthy"] = is_healthy(view.consecutive_failures, self.ingest)
        return fields

    def reachable(self) -> str | None:
        """None when the ledger answers a trivial query, else why not (for readiness)."""
        try:
            with self.sessions() as session:
                current_version(session)
        except (LedgerError, SQLAlchemyError, OSError) as exc:
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            return f"ledger: not reachable: {first_line}"
        return None
