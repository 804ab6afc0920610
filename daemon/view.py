"""The running daemon as the HTTP API sees it: `DaemonView` implements `daemon.service_view.ServiceView`.

Reads go to the ledger through `LedgerView` (a session per call); queries read one consistent
version of the live weights through `WeightState.reading()`; everything is thread-safe because the
API calls it from several worker threads at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from daemon.model_state import RevertOutcome
from daemon.querying import answer_query
from daemon.service_view import Conflict, InvalidInput, Unavailable
from editing.model.loading import LoadedModel
from editing.state.weights import WeightState
from store.artefacts import ArtefactError
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
    editor_detail: str | None = "not loaded yet"
    training_progress: float | None = None
    paused: bool = False
    pause_reason: str | None = None
    stopping: bool = False
    #: The edit loop's exact revert (set once the model state is open); without it reverts are refused.
    reverter: Callable[..., RevertOutcome] | None = None

    def readiness(self) -> list[str]:
        reasons = []
        if self.stopping:
            reasons.append("shutting down")
        if self.model is None:
            reasons.append("model: loading")
        if self.editor_state != "ready":
            reasons.append(f"editor: {self.editor_state}" + (f" ({self.editor_detail})" if self.editor_detail else ""))
        if self.paused:
            reasons.append("editing paused" + (f" ({self.pause_reason})" if self.pause_reason else ""))
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
            editor=EditorStatus(
                state=self.editor_state,  # type: ignore[arg-type]
                detail=self.editor_detail,
                training_progress=self.training_progress if self.editor_state == "training" else None,
            ),
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
        """Exact revert of the ledger and the live weights together, between two edit batches."""
        if self.reverter is None:
            raise Unavailable("the model state is still loading; try again when /readyz no longer says model: loading")
        try:
            outcome = self.reverter(to_version=to_version, last=last, reason=reason, requested_by=requested_by)
        except (LedgerError, ArtefactError) as exc:
            raise Conflict(str(exc)) from None
        return RevertResult(
            revert_id=outcome.revert_id,
            from_version=outcome.from_version,
            to_version=outcome.to_version,
            reverted_commits=outcome.reverted_commits,
            reverted_facts=outcome.reverted_facts,
            weights_restored=True,
        )
