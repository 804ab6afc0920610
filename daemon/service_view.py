"""What the HTTP API needs from the running service: the `ServiceView` protocol and its errors.

The API (`daemon.api`) only calls these methods; it never touches the model, the editor or the
ledger itself. Methods are called from the server's worker threads, several at once, so an
implementation must be thread-safe: `query` must read one consistent version of the weights (never a
half-applied edit), `request_revert` must go through the service's single model writer.

Errors: raise the `ViewError` subclasses below; the API turns them into their status codes with the
message as ``detail``. Anything else is a bug and answers 500.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from daemon.api_models import (
    CommitOut,
    FactDetail,
    FactSummary,
    QueryResult,
    RevertResult,
    ServiceStatus,
    SubmitSummary,
)
from store.models import FactStatus

if TYPE_CHECKING:  # daemon.served_model raises the errors defined here
    from daemon.served_model import GenerationRequest, GenerationSink, ServedGeneration, ServedVersion


class ViewError(RuntimeError):
    """A request the service cannot satisfy; `status_code` is the HTTP status the API answers."""

    status_code = 500


class NotFound(ViewError, LookupError):
    """The fact, version or source named does not exist."""

    status_code = 404


class Conflict(ViewError):
    """The request contradicts the ledger's state (e.g. reverting to the current version)."""

    status_code = 409


class InvalidInput(ViewError, ValueError):
    """The request is well-formed but unusable (e.g. a document ingest cannot read at all)."""

    status_code = 422


class Unavailable(ViewError):
    """The service cannot do this now (model loading, editor training, shutting down)."""

    status_code = 503


class ServiceView(Protocol):
    """The service as the HTTP API sees it."""

    def readiness(self) -> list[str]:
        """Why the service is not ready (model and editor loaded and matching, ledger reachable, not
        shutting down); an empty list when it is. Paused editing is no reason: queries are still
        answered. Must answer quickly and never raise."""
        ...

    def pause_reason(self) -> str | None:
        """Why editing is paused (drift, a blocked gate, a failed revert), or None while it runs."""
        ...

    def status(self) -> ServiceStatus:
        """The daemon at a glance (GET /v1/status)."""
        ...

    def list_facts(self, *, status: FactStatus | None, source: str | None, limit: int) -> list[FactSummary]:
        """Facts in id order, at most `limit`, optionally one status and/or one source; NotFound for an unknown source."""
        ...

    def get_fact(self, fact_id: int) -> FactDetail:
        """One fact with its history; NotFound if there is none with this id."""
        ...

    def submit_facts(self, document: bytes, *, origin: str) -> SubmitSummary:
        """Ingest a JSON document ``{"facts": [...]}`` (already checked to have that shape) like the drop folder.

        Valid records become pending facts, invalid ones recorded rejections; both are durable when this
        returns. `origin` describes the request for provenance ("POST /v1/facts from 127.0.0.1").
        InvalidInput when ingest cannot read the document at all.
        """
        ...

    def list_commits(self, *, limit: int) -> list[CommitOut]:
        """Commits newest first, at most `limit`."""
        ...

    def query(self, prompt: str, answers: Sequence[str], max_new_tokens: int) -> QueryResult:
        """Greedy completion of `prompt` and the probability of each answer, all from one version of the
        live weights. Unavailable while no model is loaded; InvalidInput for an answer that tokenises to nothing."""
        ...

    def served_model(self) -> ServedVersion:
        """The model the OpenAI routes serve: its id, the version of the live weights and their hash.
        Unavailable while no model is loaded."""
        ...

    def generate(self, request: GenerationRequest, sink: GenerationSink | None = None) -> ServedGeneration:
        """Answer a chat or text prompt from one whole version of the live weights (a commit or revert waits),
        telling `sink` (when given) the version and then the text as it grows. Unavailable while no model is
        loaded; NotFound for another model id; InvalidInput for a prompt it cannot take."""
        ...

    def request_revert(
        self, *, to_version: int | None, last: int | None, reason: str | None, requested_by: str
    ) -> RevertResult:
        """Revert to `to_version`, or the newest `last` commits (exactly one is given), ledger and weights.

        Conflict when the ledger refuses (unknown version, nothing to revert); Unavailable when the
        service cannot revert now. Returns after the ledger recorded the revert; `weights_restored`
        says whether the live weights already match.
        """
        ...
