"""`DaemonView`, the running daemon as the API sees it: status and readiness read from the `ServiceState`.

A real server on loopback over a real SQLite ledger; no model is loaded (the view says so), which
is all these answers need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from daemon.http_server import HttpServer
from daemon.ledger_view import LedgerView
from daemon.metrics import Metrics
from daemon.service_state import EditorState, ServiceState
from daemon.view import DaemonView
from ingest.config import IngestConfig

REASON = "drift: flip rate 0.31 > max_flip_rate 0.2"


@pytest.fixture
def view(make_ledger: Callable[[], Any], fresh_metrics: Metrics) -> DaemonView:
    sessions = make_ledger()
    return DaemonView(
        ledger=LedgerView(sessions, IngestConfig.model_validate({}), fresh_metrics), sessions=sessions, state=ServiceState()
    )


@pytest.fixture
def api(view: DaemonView, fresh_metrics: Metrics, serve_api: Callable[..., HttpServer]) -> Iterator[httpx.Client]:
    server = serve_api(view, fresh_metrics)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def test_status_says_why_editing_is_paused(view: DaemonView, api: httpx.Client) -> None:
    assert (api.get("/v1/status").json()["pause_reason"], view.status().pause_reason) == (None, None)
    view.state.pause(REASON)
    status = api.get("/v1/status").json()
    assert (status["paused"], status["pause_reason"]) == (True, REASON)
    assert api.get("/readyz").json()["pause_reason"] == REASON  # the same words in both places
    view.state.resume()
    assert api.get("/v1/status").json()["pause_reason"] is None


def test_the_editor_state_is_the_enum(view: DaemonView, api: httpx.Client) -> None:
    assert view.status().editor.state is EditorState.MISSING
    view.state.set_editor(EditorState.FAILED, "checkpoint of another model")
    assert view.status().editor.state is EditorState.FAILED
    assert api.get("/v1/status").json()["editor"] == {
        "state": "failed", "training_progress": None, "detail": "checkpoint of another model",
    }
    schema = api.get("/openapi.json").json()["components"]["schemas"]
    assert schema["EditorState"]["enum"] == [state.value for state in EditorState]
