"""The running daemon as the HTTP API sees it: `DaemonView` implements `daemon.service_view.ServiceView`.

Reads go to the ledger through `LedgerView` (a session per call); queries read one consistent
version of the live weights through `WeightState.reading()`; the editor, pauses and stopping are read
from the service's `ServiceState`. Everything is thread-safe because the API calls it from several
worker threads at once.
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
from daemon.model_state import RevertReport
from daemon.querying import answer_query
from daemon.served_model import GenerationRequest, GenerationSink, ServedGeneration, ServedModel, ServedVersion
from daemon.service_state import EditorState, ServiceState
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
    state: ServiceState = field(default_factory=ServiceState)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    model: LoadedModel | None = None
    weights: WeightState | None = None
    #: The edit loop's exact revert (set once the model state is open); without it reverts are refused.
    reverter: Callable[..., RevertReport] | None = None
    #: What the OpenAI routes serve, built on first use from `model` and `weights`.
    _served: ServedModel | None = field(default=None, init=False, repr=False)

    def readiness(self) -> list[str]:
        # A pause is no reason: a paused daemon still answers queries, takes facts and reverts.
        now = self.state.now()
        reasons = []
        if now.stopping:
            reasons.append("shutting down")
        if self.model is None:
            reasons.append("model: loading")
        if now.editor is not EditorState.READY:
            reasons.append(f"editor: {now.editor}" + (f" ({now.editor_detail})" if now.editor_detail else ""))
        problem = self.ledger.reachable()
        if problem:
            reasons.append(problem)
        return reasons

    def pause_reason(self) -> str | None:
        return self.state.now().pause_reason

    def status(self) -> ServiceStatus:
        reasons = self.readiness()
        model = self.model
        now = self.state.now()
        return ServiceStatus(
            ready=not reasons,
            reasons=reasons,
            paused=now.paused,
            pause_reason=now.pause_reason,
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
                state=now.editor,
                detail=now.editor_detail,
                training_progress=now.training.ratio if now.editor is EditorState.TRAINING and now.training else None,
            ),
            ledger=self.ledger.ledger_status(),
        )

    def list_facts(self, *, status: FactStatus | None, source: str | None, limit: int) -> list[FactSummary]:
        return self.ledger.list_facts(status=status, source=source, limit=limit)

    def get_fact(self, fact_id: int) -> FactDetail:
        return self.ledger.get_fact(fact_id)

    def submit_facts(self, document: bytes, *, origin: str) -> SubmitSummary:
        if self.state.now().stopping:
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

    def served_model(self) -> ServedVersion:
        with self._serving().pinned() as served:
            return served

    def generate(self, request: GenerationRequest, sink: GenerationSink | None = None) -> ServedGeneration:
        return self._serving().generate(request, sink)

    def _serving(self) -> ServedModel:
        model, weights, served = self.model, self.weights, self._served
        if model is None or weights is None:
            raise Unavailable("the model is still loading")
        if served is None or served.weights is not weights:
            served = self._served = ServedModel(model, weights)
        return served

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
