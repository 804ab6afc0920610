"""What the HTTP API answers to bodies it cannot use: every JSON endpoint alike, nothing echoed back at length.

A real server on loopback over a real SQLite ledger and a tiny model: a body that is not valid JSON
gets 400, one not sent as application/json gets 415, a valid document with wrong fields gets 422
whose errors quote a field's input only when it is short.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from daemon.api_guards import MAX_QUOTED_INPUT_CHARS
from daemon.http_server import HttpServer
from daemon.metrics import Metrics
from tests.daemon.conftest import RealView

#: Every endpoint with a JSON body, with a body it accepts.
JSON_ENDPOINTS = {
    "/v1/query": b'{"prompt": "The capital of France is", "max_new_tokens": 0}',
    "/v1/facts": b'{"facts": [{"prompt": "The capital of France is", "target_new": "Rome"}]}',
    "/v1/revert": b'{"to_version": 0}',
}

NOT_JSON = {
    "cut short": b'{"prompt": "The capital',
    "a trailing comma": b'{"prompt": "x",}',
    "NaN": b'{"prompt": NaN}',
    "a key twice": b'{"prompt": "a", "prompt": "b"}',
    "not UTF-8": b'{"prompt": "caf\xe9"}',
    "empty": b"",
}


@pytest.fixture
def api(
    make_ledger: Callable[[], Any], tiny_lm: tuple[Any, Any], fresh_metrics: Metrics,
    serve_api: Callable[..., HttpServer],
) -> Iterator[httpx.Client]:
    server = serve_api(RealView(make_ledger(), tiny_lm, fresh_metrics), fresh_metrics,
                       rate_limit_per_second=1000, rate_limit_burst=1000)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _nothing_stored(api: httpx.Client) -> bool:
    status = api.get("/v1/status").json()["ledger"]
    return api.get("/v1/facts").json()["facts"] == [] and status["rejections"] == 0 and status["model_version"] == 0


@pytest.mark.parametrize("path", sorted(JSON_ENDPOINTS))
@pytest.mark.parametrize("case", sorted(NOT_JSON))
def test_a_body_that_is_not_valid_json_gets_400(api: httpx.Client, path: str, case: str) -> None:
    answer = api.post(path, content=NOT_JSON[case], headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert isinstance(answer.json()["detail"], str) and answer.json()["detail"]
    assert _nothing_stored(api)


@pytest.mark.parametrize("path", sorted(JSON_ENDPOINTS))
def test_a_400_says_what_is_wrong_with_the_json(api: httpx.Client, path: str) -> None:
    """The JSON of ingest (docs/ingest.md): no NaN or Infinity, no key twice in one object."""
    details = [
        api.post(path, content=NOT_JSON[case], headers={"content-type": "application/json"}).json()["detail"]
        for case in ("a trailing comma", "NaN", "a key twice")
    ]
    assert details == [
        "body: invalid JSON: Expecting property name enclosed in double quotes at line 1 column 16",
        "body: invalid JSON: NaN is not valid JSON",
        "body: invalid JSON: key 'prompt' appears twice in one object",
    ]


@pytest.mark.parametrize("path", sorted(JSON_ENDPOINTS))
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_sent_as_json_gets_415(api: httpx.Client, path: str, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    answer = api.post(path, content=JSON_ENDPOINTS[path], headers=headers)
    assert answer.status_code == 415
    assert answer.json() == {"detail": "send the body as JSON, with the header Content-Type: application/json"}
    assert _nothing_stored(api)


@pytest.mark.parametrize("path", sorted(JSON_ENDPOINTS))
def test_the_same_body_as_json_is_accepted(api: httpx.Client, path: str) -> None:
    """The 400s and 415s above are about the body alone: sent properly, each endpoint takes it."""
    answer = api.post(path, content=JSON_ENDPOINTS[path], headers={"content-type": "application/json; charset=utf-8"})
    assert answer.status_code == (409 if path == "/v1/revert" else 200), answer.text  # nothing to revert yet


def test_a_422_does_not_echo_a_long_prompt(api: httpx.Client) -> None:
    prompt = "The capital of France is " + "very " * 2000
    answer = api.post("/v1/query", json={"prompt": prompt, "answers": ["Paris"]})
    assert answer.status_code == 422
    assert "very very" not in answer.text and len(answer.text) < 500
    [error] = answer.json()["detail"]
    assert (error["loc"], error["type"], "input" in error) == (["body", "prompt"], "string_too_long", False)


def test_a_422_quotes_a_short_input(api: httpx.Client) -> None:
    answer = api.post("/v1/query", json={"prompt": "x", "max_new_tokens": -1})
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert (error["loc"], error["input"]) == (["body", "max_new_tokens"], -1)
    listed = api.get("/v1/facts", params={"status": "x" * (MAX_QUOTED_INPUT_CHARS + 1)})
    assert listed.status_code == 422 and "input" not in listed.json()["detail"][0]


def test_the_schema_lists_400_and_415_for_every_json_endpoint(api: httpx.Client) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    for path in JSON_ENDPOINTS:
        assert {"400", "415"} <= set(paths[path]["post"]["responses"]), path
