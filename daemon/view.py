"""The running daemon as the HTTP API sees it: `DaemonView` implements `daemon.service_view.ServiceView`.

Reads go to the ledger through `LedgerView` (a session per call); queries read one consistent
version of the live weights through `WeightState.reading()`; everything is thread-safe because the
API calls it from several worker threads at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from daemon.api_models import (
    CommitOut,
    EditorStatus,
    FactDetail,
    FactSummary,
    ModelStatus,
    QueryResult,
    RevertResult,
    ServiceStatus,
    SubmitSummary,
)
from daemon.ledger_view import LedgerView
from daemon.querying import answer_query
from daemon.service_view import Conflict, InvalidInput, Unavailable
from editing.loading import LoadedModel
from editing.weights import WeightState
from store import commits
from store.errors import LedgerError
from store.models import FactStatus


@dataclass
class DaemonView:
    """What the service shares with its API. The service fills in `model` and `weights` once loaded."""

    ledger: LedgerView
    sessions: sessionmaker[Session]
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    model: LoadedModel | None = None
    weights: WeightState | None = None
    editor_state: str = "missing"
    editor_detail: str | None = "the edit loop is not part of this build yet"
    paused: bool = False
    stopping: bool = False

    def readiness(self) -> list[str]:
        reasons = []
        if self.stopping:
            reasons.append("shutting down")
        if self.model is None:
            reasons.append("model: loading")
        if self.editor_state != "ready":
            reasons.append(f"editor: {self.editor_state}" + (f" ({self.editor_detail})" if self.editor_detail else ""))
        if self.paused:
            reasons.append("editing paused")
        problem = self.ledger.reachable()
        if problem:
            reasons.append(problem)
        return reasons

    def status(self) -> ServiceStatus:
        reasons = self.readiness()
        model = self.model
        return ServiceStatus(
            ready=not reasons,
            reasons=reasons,
            paused=self.paused,
            started_at=self.started_at,
            model=None
            if model is None
            else ModelStatus(
                source=model.source,
                model_type=model.model_type,
                fingerprint=model.fingerprint,
                device=str(model.device),
            ),
            editor=EditorStatus(state=self.editor_state, detail=self.editor_detail),  # type: ignore[arg-type]
            ledger=self.ledger.ledger_status(),
        )

    def list_facts(self, *, status: FactStatus | None, source: str | None, limit: int) -> list[FactSummary]:
        return self.ledger.list_facts(status=status, source=source, limit=limit)

    def get_fact(self, fact_id: int) -> FactDetail:
        return self.ledger.get_fact(fact_id)

    def submit_facts(self, document: bytes, *, origin: str) -> SubmitSummary:
        if self.stopping:
            raise Unavailable("the daemon is shutting down")
        return self.ledger.submit_facts(document, origin=origin)

    def list_commits(self, *, limit: int) -> list[CommitOut]:
        return self.ledger.list_commits(limit=limit)

    def query(self, prompt: str, answers: Sequence[str], max_new_tokens: int) -> QueryResult:
        model, weights = self.model, self.weights
        if model is None or weights is None:
            raise Unavailable("the model is still loading")
        with weights.reading() as version:
            try:
                return answer_query(
                    model.model,
                    model.tokenizer,
                    model_version=version,
                    prompt=prompt,
                    answers=answers,
                    max_new_tokens=max_new_tokens,
                )
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None

    def request_revert(
        self, *, to_version: int | None, last: int | None, reason: str | None, requested_by: str
    ) -> RevertResult:
        """Revert in the ledger. Without an edit loop this build never commits, so no weights change."""
        try:
            with self.sessions.begin() as session:
                if to_version is not None:
                    revert = commits.revert_to(
                        session=session, to_version=to_version, reason=reason, requested_by=requested_by
                    )
                else:
                    revert = commits.revert_last(
                        session=session, count=last or 1, reason=reason, requested_by=requested_by
                    )
                result = RevertResult(
                    revert_id=revert.id,
                    from_version=revert.from_version,
                    to_version=revert.to_version,
                    reverted_commits=revert.reverted_commits,
                    reverted_facts=revert.reverted_facts,
                    weights_restored=False,
                )
        except LedgerError as exc:
            raise Conflict(str(exc)) from None
        return result
