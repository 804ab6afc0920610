"""The HTTP API: `create_app(api_config, view, metrics)` builds the FastAPI application.

Endpoints (docs/api.md has examples):

- ``GET /healthz``: the process answers. ``GET /readyz``: 200 when ready, 503 with the reasons; a
  paused daemon still answers queries, so it stays ready and says that editing is paused.
- ``GET /metrics``: Prometheus exposition (when metrics are enabled).
- ``GET /v1/status``, ``GET /v1/facts``, ``GET /v1/facts/{fact_id}``, ``GET /v1/commits``.
- ``POST /v1/query``: completion and answer probabilities from the live edited model.
- ``POST /v1/facts`` and ``POST /v1/revert``: write endpoints, behind the bearer token when one is
  configured, absent when ``api.write_enabled`` is false.
- The review queue (docs/trust.md), behind the same token: ``GET /v1/review``, ``POST
  /v1/facts/{fact_id}/approve`` and ``/reject``, and the bulk forms ``POST /v1/review/approve`` and
  ``/reject`` with a filter.

Every answer is JSON except /metrics; errors are ``{"detail": ...}``. All work is delegated to the
`ServiceView`; blocking calls run in the server's thread pool. Nothing is built at import time.

This module does not use ``from __future__ import annotations``: routes whose body models depend on
the configuration (limits) are annotated with classes defined inside the factory functions, which
FastAPI can only see when annotations are evaluated at definition time.
"""

import importlib.metadata
import time
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from daemon.api_guards import (
    BodyLimit,
    RateLimit,
    RequestMetrics,
    TokenBuckets,
    answer_validation_error,
    bearer_guard,
    json_body,
)
from daemon.api_models import (
    BulkDecision,
    CommitList,
    Decision,
    ErrorBody,
    FactDetail,
    FactList,
    FactsSubmission,
    Health,
    QueryRequest,
    QueryResult,
    Readiness,
    RevertLast,
    RevertResult,
    RevertTo,
    ReviewQueue,
    ReviewResult,
    ServiceStatus,
    SubmitSummary,
)
from daemon.config import ApiConfig
from daemon.metrics import Metrics
from daemon.openai_api import add_openai_api
from daemon.review import Action, ReviewDesk
from daemon.service_view import NotFound, ServiceView, ViewError
from store.models import FactStatus, HoldReason
from store.trust import ReviewFilter

MAX_ID = 2**53 - 1  # the largest integer every JSON client represents exactly
MAX_LIST_LIMIT = 1000

_READ_ERRORS: dict[int | str, dict[str, Any]] = {429: {"model": ErrorBody, "description": "Rate limit exceeded."}}
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body is not valid JSON."},
    413: {"model": ErrorBody, "description": "Request body larger than api.max_request_bytes."},
    415: {"model": ErrorBody, "description": "The body is not sent as application/json."},
}
_WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_READ_ERRORS,
    **_BODY_ERRORS,
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token."},
}


def create_app(api_config: ApiConfig, view: ServiceView, metrics: Metrics, review: ReviewDesk | None = None) -> FastAPI:
    """The application: routes over `view`, guarded by `api_config`'s token and limits, counted in `metrics`;
    with `review`, the review queue's routes too (behind the write token)."""
    app = FastAPI(
        title="Lifelong knowledge-editing daemon",
        version=_package_version(),
        description="Facts in, edited model out: ledger, commits, queries and reverts. See docs/api.md.",
    )
    _add_health_routes(app, view, metrics)
    _add_read_routes(app, view)
    _add_query_route(app, view, metrics, api_config.max_new_tokens)
    if api_config.write_enabled:
        _add_write_routes(app, view, api_config)
        if review is not None:
            _add_review_routes(app, review, api_config)

    app.exception_handler(RequestValidationError)(answer_validation_error)

    @app.exception_handler(ViewError)
    async def _view_error(_request: Request, exc: ViewError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    # Added last = outermost: metrics see every answer, including the limits' refusals.
    app.add_middleware(BodyLimit, max_bytes=api_config.max_request_bytes)
    app.add_middleware(
        RateLimit, buckets=TokenBuckets(api_config.rate_limit_per_second, api_config.rate_limit_burst)
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    add_openai_api(app, api_config, view, metrics)  # after the limits: its error shape wraps their refusals
    return app


def _package_version() -> str:
    try:
        return importlib.metadata.version("lifelong-edit-daemon")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _add_health_routes(app: FastAPI, view: ServiceView, metrics: Metrics) -> None:
    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health()

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: model and editor loaded and matching, ledger reachable; whether editing is paused",
        responses={503: {"model": Readiness, "description": "Not ready; `reasons` says why."}},
    )
    def readyz(response: Response) -> Readiness:
        reasons = view.readiness()
        if reasons:
            response.status_code = 503
        pause = view.pause_reason()
        return Readiness(ready=not reasons, reasons=reasons, editing_paused=pause is not None, pause_reason=pause)

    if metrics.config.enabled:

        @app.get(
            "/metrics",
            tags=["health"],
            summary="Prometheus metrics",
            response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Exposition"}},
        )
        async def scrape(request: Request) -> Response:
            body, content_type = metrics.exposition(request.headers.get("accept"))
            return Response(content=body, media_type=content_type)


def _add_read_routes(app: FastAPI, view: ServiceView) -> None:
    @app.get("/v1/status", tags=["ledger"], summary="The daemon at a glance", responses=_READ_ERRORS)
    def status() -> ServiceStatus:
        return view.status()

    @app.get(
        "/v1/facts",
        tags=["ledger"],
        summary="List facts in id order",
        responses={**_READ_ERRORS, 404: {"model": ErrorBody, "description": "Unknown source."}},
    )
    def list_facts(
        status: Annotated[FactStatus | None, Query(description="Only facts in this status.")] = None,
        source: Annotated[str | None, Query(max_length=200, description="Only facts that arrived from this source.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 100,
    ) -> FactList:
        if source is not None and not source.isprintable():
            # No source name holds control characters, and Postgres refuses NUL in a query.
            raise NotFound(f"no source named {source!r} in the ledger")
        return FactList(facts=view.list_facts(status=status, source=source, limit=limit))

    @app.get(
        "/v1/facts/{fact_id}",
        tags=["ledger"],
        summary="One fact with its history",
        responses={**_READ_ERRORS, 404: {"model": ErrorBody, "description": "No such fact."}},
    )
    def get_fact(fact_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> FactDetail:
        return view.get_fact(fact_id)

    @app.get("/v1/commits", tags=["ledger"], summary="Commits, newest first", responses=_READ_ERRORS)
    def list_commits(limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 100) -> CommitList:
        return CommitList(commits=view.list_commits(limit=limit))


def _add_query_route(app: FastAPI, view: ServiceView, metrics: Metrics, token_limit: int) -> None:
    class BoundedQueryRequest(QueryRequest):
        __doc__ = QueryRequest.__doc__
        max_new_tokens: int = Field(
            min(16, token_limit), ge=0, le=token_limit,
            description="Tokens to generate greedily (0: none); at most api.max_new_tokens.",
        )

    @app.post(
        "/v1/query",
        tags=["model"],
        summary="Complete a prompt with the live edited model; score answers",
        responses={
            **_READ_ERRORS,
            **_BODY_ERRORS,
            503: {"model": ErrorBody, "description": "No model loaded yet, or shutting down."},
        },
        dependencies=[Depends(json_body)],
    )
    def query(body: BoundedQueryRequest) -> QueryResult:
        started = time.perf_counter()
        result = view.query(body.prompt, body.answers, body.max_new_tokens)
        metrics.observe_query(seconds=time.perf_counter() - started, generated_tokens=result.generated_tokens)
        return result


def submission_model(max_facts: int) -> type[FactsSubmission]:
    """`FactsSubmission` with at most `max_facts` records (api.max_facts_per_request)."""

    class BoundedFactsSubmission(FactsSubmission):
        __doc__ = FactsSubmission.__doc__
        facts: list[dict[str, Any]] = Field(
            min_length=1, max_length=max_facts, description="Fact records in the ingest format (docs/ingest.md)."
        )

    return BoundedFactsSubmission


def _add_write_routes(app: FastAPI, view: ServiceView, config: ApiConfig) -> None:
    guard = Depends(bearer_guard(config.token))
    submission = submission_model(config.max_facts_per_request)
    body_schema = submission.model_json_schema()
    body_schema["title"] = "FactsSubmission"

    @app.post(
        "/v1/facts",
        tags=["ledger"],
        summary="Submit facts in the ingest format",
        dependencies=[guard, Depends(json_body)],
        responses={
            **_WRITE_ERRORS,
            422: {"model": ErrorBody, "description": "Not a {\"facts\": [...]} document."},
        },
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}},
    )
    async def post_facts(request: Request) -> SubmitSummary:
        body = await request.body()
        try:
            submission.model_validate_json(body)
        except ValidationError as exc:
            # Without the input: it may be bytes that are not UTF-8, which no JSON answer can quote.
            raise RequestValidationError(exc.errors(include_url=False, include_context=False, include_input=False)) from None
        client = request.client.host if request.client else "unknown"
        return await run_in_threadpool(view.submit_facts, body, origin=f"POST /v1/facts from {client}")

    @app.post(
        "/v1/revert",
        tags=["ledger"],
        summary="Revert commits: ledger and live weights",
        dependencies=[guard, Depends(json_body)],
        responses={
            **_WRITE_ERRORS,
            409: {"model": ErrorBody, "description": "The ledger refuses (unknown version, nothing to revert)."},
            503: {"model": ErrorBody, "description": "The service cannot revert now."},
        },
    )
    def revert(body: RevertTo | RevertLast, request: Request) -> RevertResult:
        client = request.client.host if request.client else "unknown"
        to_version = body.to_version if isinstance(body, RevertTo) else None
        last = body.last if isinstance(body, RevertLast) else None
        return view.request_revert(to_version=to_version, last=last, reason=body.reason, requested_by=f"api:{client}")


def _reviewer(body: Decision, request: Request) -> str:
    if body.reviewer is not None:
        return f"api:{body.reviewer.strip()}"
    return f"api:{request.client.host if request.client else 'unknown'}"


def _add_review_routes(app: FastAPI, desk: ReviewDesk, config: ApiConfig) -> None:
    guard = Depends(bearer_guard(config.token))
    decision_errors: dict[int | str, dict[str, Any]] = {
        **_WRITE_ERRORS,
        404: {"model": ErrorBody, "description": "No such fact or source, or no held fact matches the filter."},
        409: {"model": ErrorBody, "description": "A fact named is not waiting (not held)."},
    }

    @app.get(
        "/v1/review",
        tags=["review"],
        summary="Facts waiting for review or for their source's limits, oldest first",
        dependencies=[guard],
        responses={**_READ_ERRORS, 401: _WRITE_ERRORS[401], 404: {"model": ErrorBody, "description": "Unknown source."}},
    )
    def list_review(
        source: Annotated[str | None, Query(max_length=200, description="Only facts that arrived from this source.")] = None,
        origin: Annotated[str | None, Query(max_length=4096, description="Only facts from this file path or URL.")] = None,
        held_for: Annotated[HoldReason | None, Query(description="Only facts held for this reason.")] = None,
        prompt: Annotated[str | None, Query(max_length=2000, description="Only prompts containing this text.")] = None,
        answers: Annotated[bool, Query(description="Add the live model's current answer to each prompt.")] = False,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 100,
    ) -> ReviewQueue:
        for text in (source, origin, prompt):
            if text is not None and not text.isprintable():
                raise NotFound(f"no held fact matches {text!r}")
        selection = ReviewFilter(source=source, origin=origin, reason=held_for, prompt_contains=prompt)
        items, summary, problem = desk.queue(selection, limit=limit, answers=answers)
        return ReviewQueue.model_validate(
            {"held": [item.as_dict() for item in items], "queue": asdict(summary), "answers_missing": problem}
        )

    def decide(action: Action, selection: ReviewFilter, body: Decision, request: Request) -> ReviewResult:
        outcome = desk.decide(action, selection, reviewer=_reviewer(body, request), reason=body.reason)
        return ReviewResult.model_validate(asdict(outcome))

    for action in ("approve", "reject"):
        _add_decision_routes(app, action, decide, guard, decision_errors)  # type: ignore[arg-type]


def _add_decision_routes(
    app: FastAPI,
    action: Action,
    decide: Any,
    guard: Any,
    errors: dict[int | str, dict[str, Any]],
) -> None:
    @app.post(
        f"/v1/facts/{{fact_id}}/{action}",
        tags=["review"],
        summary=f"{action.capitalize()} one held fact",
        dependencies=[guard, Depends(json_body)],
        responses=errors,
        name=f"{action}_fact",
    )
    def one(fact_id: Annotated[int, Path(ge=1, le=MAX_ID)], body: Decision, request: Request) -> ReviewResult:
        return decide(action, ReviewFilter(ids=(fact_id,)), body, request)  # type: ignore[no-any-return]

    @app.post(
        f"/v1/review/{action}",
        tags=["review"],
        summary=f"{action.capitalize()} every held fact a filter matches",
        dependencies=[guard, Depends(json_body)],
        responses=errors,
        name=f"{action}_matching",
    )
    def bulk(body: BulkDecision, request: Request) -> ReviewResult:
        given = body.filter
        selection = ReviewFilter(
            ids=tuple(given.ids) if given.ids else None,
            source=given.source,
            origin=given.origin,
            reason=given.held_for,
            prompt_contains=given.prompt_contains,
        )
        if selection.is_empty():
            raise _EmptyFilter("the filter names nothing: give ids, source, origin, held_for or prompt_contains")
        return decide(action, selection, body, request)  # type: ignore[no-any-return]


class _EmptyFilter(ViewError):
    status_code = 422
