"""The HTTP API against a running server: a real SQLite ledger, a real tiny model, real HTTP on loopback."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry

from daemon.api_guards import TokenBuckets, UnsafeExposure, check_exposure, is_loopback
from daemon.config import ApiConfig
from daemon.http_server import HttpServer
from daemon.metrics import Metrics
from store import states
from store.models import FactStatus, FailureCause
from tests.daemon.conftest import RealView

FACT = {"prompt": "The capital of France is", "target_new": "Rome", "ground_truth": "Paris"}
TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def view(make_ledger: Callable[[], Any], tiny_lm: tuple[Any, Any], fresh_metrics: Metrics) -> RealView:
    return RealView(make_ledger(), tiny_lm, fresh_metrics)


@pytest.fixture
def client(view: RealView, fresh_metrics: Metrics, serve_api: Callable[..., HttpServer]) -> Iterator[httpx.Client]:
    server = serve_api(view, fresh_metrics, rate_limit_per_second=1000, rate_limit_burst=1000)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_health_and_readiness_follow_the_service(client: httpx.Client, view: RealView, fresh_metrics: Metrics) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    running = {"ready": True, "reasons": [], "editing_paused": False, "pause_reason": None}
    assert (ready.status_code, ready.json()) == (200, running)
    assert sample(fresh_metrics, "ked_ready") == 1
    view.not_ready = ["editor: training (42%)"]
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json() == running | {"ready": False, "reasons": ["editor: training (42%)"]}
    assert sample(fresh_metrics, "ked_ready") == 0  # read at scrape time, not set by /readyz


def test_a_paused_daemon_stays_ready_and_says_editing_is_paused(
    client: httpx.Client, view: RealView, fresh_metrics: Metrics
) -> None:
    # Deliberate change (issue 23, item 6): a pause used to make /readyz answer 503, so a readiness probe
    # took a daemon that still answers queries out of service. It is reported, not a reason.
    view.state.pause("gate: the model before this batch already fails specificity")
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "reasons": [],
        "editing_paused": True,
        "pause_reason": "gate: the model before this batch already fails specificity",
    }
    assert client.get("/v1/status").json()["paused"] is True
    assert client.post("/v1/query", json={"prompt": "The capital of France is"}).status_code == 200
    assert sample(fresh_metrics, "ked_ready") == 1
    assert sample(fresh_metrics, "ked_editing_paused") == 1
    view.state.resume()
    assert client.get("/readyz").json()["editing_paused"] is False
    assert sample(fresh_metrics, "ked_editing_paused") == 0


def test_an_unusable_ledger_makes_the_service_unready(
    tmp_path: Any, tiny_lm: tuple[Any, Any], fresh_metrics: Metrics, serve_api: Callable[..., HttpServer]
) -> None:
    from store.db import make_engine, make_session_factory

    unmigrated = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}"))
    server = serve_api(RealView(unmigrated, tiny_lm, fresh_metrics), fresh_metrics)
    answer = httpx.get(f"{server.url}/readyz")
    assert answer.status_code == 503
    (reason,) = answer.json()["reasons"]
    assert reason.startswith("ledger: not reachable:") and "commits" in reason


def test_submitted_facts_are_validated_stored_and_listed(client: httpx.Client, fresh_metrics: Metrics) -> None:
    records = [FACT, {"prompt": "The CEO of Acme is", "target_new": "  "}, FACT, {"prompt": "x", "target_nwe": "y"}]
    answer = client.post("/v1/facts", json={"facts": records})
    assert answer.status_code == 200, answer.text
    summary = answer.json()
    assert (summary["accepted"], summary["duplicates"], summary["rejected"]) == (1, 1, 2)
    assert summary["fact_ids"][0] == summary["fact_ids"][1]
    reasons = {r["origin"]["position"]: (r["reason"], r["code"]) for r in summary["rejections"]}
    assert reasons["item 2"] == ("target_new: must not be empty or whitespace", "empty_text")
    assert reasons["item 4"][1] == "unknown_field"

    listing = client.get("/v1/facts", params={"status": "pending"}).json()["facts"]
    assert [(f["prompt"], f["target_new"], f["source"]) for f in listing] == [(FACT["prompt"], "Rome", "api")]
    detail = client.get(f"/v1/facts/{listing[0]['id']}").json()
    assert detail["ground_truth"] == "Paris"
    assert [o["location"] for o in detail["origins"]] == ["POST /v1/facts from 127.0.0.1"] * 2
    assert client.get("/v1/facts/999999").status_code == 404
    assert client.get("/v1/facts", params={"source": "nowhere"}).status_code == 404
    assert client.get("/v1/facts", params={"status": "bogus"}).status_code == 422

    assert sample(fresh_metrics, "ked_facts_ingested_total", source="api") == 1
    assert sample(fresh_metrics, "ked_facts_duplicate_total", source="api") == 1
    assert sample(fresh_metrics, "ked_facts_rejected_total", source="api", reason="empty_text") == 1


def test_facts_carry_the_cause_of_their_last_failure(client: httpx.Client, view: RealView) -> None:
    records = [FACT, {"prompt": "The CEO of Acme is", "target_new": "Jane Roe"}]
    first, second = client.post("/v1/facts", json={"facts": records}).json()["fact_ids"]
    with view.sessions.begin() as session:
        states.transition(session=session, fact_ids=[first, second], to=FactStatus.EDITING)
        states.transition(
            session=session, fact_ids=[first], to=FactStatus.FAILED, error="efficacy 0.12 < min_efficacy 0.9",
            failure_cause=FailureCause.EFFICACY,
        )
    listing = client.get("/v1/facts").json()["facts"]
    assert [(f["id"], f["status"], f["failure_cause"]) for f in listing] == [
        (first, "failed", "efficacy"), (second, "editing", None),
    ]
    detail = client.get(f"/v1/facts/{first}").json()
    assert (detail["last_error"], detail["failure_cause"]) == ("efficacy 0.12 < min_efficacy 0.9", "efficacy")


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b'{"facts": []}', "application/json", 422),
        (b'{"facts": [1, 2]}', "application/json", 422),
        # NaN and a key given twice are not valid JSON: 400 since issue 23 (item 6), as docs/api.md promised
        # for invalid JSON; they used to get 422.
        (b'{"facts": [{"prompt": "a", "target_new": NaN}]}', "application/json", 400),
        (b'{"facts": [{"prompt": "a", "prompt": "b", "target_new": "c"}]}', "application/json", 400),
        (b"[" + json.dumps(FACT).encode() + b"]", "application/json", 422),
        (json.dumps({"facts": [FACT]}).encode(), "text/plain", 415),
    ],
)
def test_bad_submissions_are_refused_with_a_reason(client: httpx.Client, body: bytes, content_type: str, status: int) -> None:
    answer = client.post("/v1/facts", content=body, headers={"content-type": content_type})
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"]


def test_write_endpoints_need_the_bearer_token(view: RealView, fresh_metrics: Metrics, serve_api: Callable[..., HttpServer]) -> None:
    server = serve_api(view, fresh_metrics, token=TOKEN)
    body = {"facts": [FACT]}
    with httpx.Client(base_url=server.url) as http:
        missing = http.post("/v1/facts", json=body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert http.post("/v1/facts", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.post("/v1/revert", json={"last": 1}).status_code == 401
        assert http.post("/v1/facts", json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert http.get("/v1/facts").status_code == 200  # reads need no token
        schema = http.get("/openapi.json").json()
    assert schema["paths"]["/v1/facts"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/v1/facts"]["get"]


def test_without_write_endpoints_they_are_absent(view: RealView, fresh_metrics: Metrics, serve_api: Callable[..., HttpServer]) -> None:
    server = serve_api(view, fresh_metrics, write_enabled=False)
    with httpx.Client(base_url=server.url) as http:
        assert http.post("/v1/facts", json={"facts": [FACT]}).status_code == 405
        assert http.post("/v1/revert", json={"last": 1}).status_code == 404
        paths = http.get("/openapi.json").json()["paths"]
    assert "post" not in paths["/v1/facts"]
    assert "/v1/revert" not in paths


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({"host": "0.0.0.0"}, True),
        ({"host": "::"}, True),
        ({"host": "example.org"}, True),
        ({"host": "10.1.2.3", "token": "  "}, True),
        ({"host": "0.0.0.0", "token": TOKEN}, False),
        ({"host": "0.0.0.0", "write_enabled": False}, False),
        ({"host": "0.0.0.0", "enabled": False}, False),
        ({"host": "127.0.0.1"}, False),
        ({"host": "127.8.9.10"}, False),
        ({"host": "::1"}, False),
        ({"host": "localhost"}, False),
    ],
)
def test_start_up_refuses_open_writes_on_the_network(fields: dict[str, Any], refused: bool) -> None:
    config = ApiConfig.model_validate(fields)
    if refused:
        with pytest.raises(UnsafeExposure, match="KED_API__TOKEN"):
            check_exposure(config)
    else:
        check_exposure(config)


def test_loopback_detection() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "[::1]", "LOCALHOST", "0.0.0.0", "192.168.1.1", "")] == [
        True, True, True, False, False, False,
    ]


def test_large_bodies_get_413_whether_announced_or_streamed(
    view: RealView, fresh_metrics: Metrics, serve_api: Callable[..., HttpServer]
) -> None:
    server = serve_api(view, fresh_metrics, max_request_bytes=2048)
    big = json.dumps({"facts": [{**FACT, "id": f"n{i}"} for i in range(100)]}).encode()
    assert len(big) > 2048

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    with httpx.Client(base_url=server.url) as http:
        announced = http.post("/v1/facts", content=big, headers={"content-type": "application/json"})
        streamed = http.post("/v1/facts", content=chunks(), headers={"content-type": "application/json"})
        small = http.post("/v1/facts", json={"facts": [FACT]})
    assert announced.status_code == 413
    assert streamed.status_code == 413
    assert "api.max_request_bytes" in streamed.json()["detail"]
    assert small.status_code == 200
    assert sample(fresh_metrics, "ked_http_requests_total", method="POST", route="limited", code="413") == 2


def test_more_facts_than_allowed_per_request_are_refused(
    view: RealView, fresh_metrics: Metrics, serve_api: Callable[..., HttpServer]
) -> None:
    server = serve_api(view, fresh_metrics, max_facts_per_request=3)
    with httpx.Client(base_url=server.url) as http:
        too_many = http.post("/v1/facts", json={"facts": [FACT] * 4})
        schema = http.get("/openapi.json").json()
    assert too_many.status_code == 422
    body_schema = schema["paths"]["/v1/facts"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema["properties"]["facts"]["maxItems"] == 3


def test_each_client_is_rate_limited_but_probes_are_not(
    view: RealView, fresh_metrics: Metrics, serve_api: Callable[..., HttpServer]
) -> None:
    server = serve_api(view, fresh_metrics, rate_limit_per_second=0.5, rate_limit_burst=3)
    with httpx.Client(base_url=server.url) as http:
        codes = [http.get("/v1/commits").status_code for _ in range(4)]
        refused = http.get("/v1/status")
        probes = {http.get(path).status_code for path in ["/healthz", "/readyz", "/metrics"] * 3}
    assert codes == [200, 200, 200, 429]
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 3
    assert probes == {200}


def test_token_buckets_refill_at_the_configured_rate() -> None:
    now = [100.0]
    buckets = TokenBuckets(rate=2.0, burst=2, clock=lambda: now[0])
    assert [buckets.take("a"), buckets.take("a")] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # other clients have their own bucket
    now[0] += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0


def _manual_greedy(model: Any, tokenizer: Any, prompt: str, steps: int) -> tuple[str, torch.Tensor]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    first_logprobs = None
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids).logits[0, -1]
            if first_logprobs is None:
                first_logprobs = torch.log_softmax(logits.float(), -1)
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    assert first_logprobs is not None
    return tokenizer.decode(ids[0, -steps:], skip_special_tokens=True), first_logprobs


def test_query_answers_from_the_live_model(client: httpx.Client, view: RealView, fresh_metrics: Metrics) -> None:
    prompt = "The capital of France is"
    words = ("Paris", "Rome", "is", "of", "the")
    single = next(a for a in words if len(view.tokenizer(" " + a, add_special_tokens=False)["input_ids"]) == 1)
    answer = client.post("/v1/query", json={"prompt": prompt, "answers": [single, "Jane Roe"], "max_new_tokens": 5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    completion, logprobs = _manual_greedy(view.model, view.tokenizer, prompt, 5)
    # generation stops early only at EOS, which the manual loop would show as an empty decode
    assert body["completion"] == completion[: len(body["completion"])]
    assert body["model_version"] == 0
    first, second = body["answers"]
    token = view.tokenizer(" " + single, add_special_tokens=False)["input_ids"][0]
    assert first["tokens"] == 1
    assert first["log_probability"] == pytest.approx(float(logprobs[token]), abs=1e-4)
    assert first["probability"] == pytest.approx(math.exp(first["log_probability"]))
    assert second["tokens"] > 1 and 0 < second["probability"] < first["probability"] * 10
    none = client.post("/v1/query", json={"prompt": prompt, "max_new_tokens": 0}).json()
    assert (none["completion"], none["generated_tokens"], none["answers"]) == ("", 0, [])
    assert sample(fresh_metrics, "ked_query_duration_seconds_count") == 2
    assert sample(fresh_metrics, "ked_query_generated_tokens_total") == body["generated_tokens"]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "", "answers": []},
        {"prompt": "   ", "answers": []},
        {"prompt": "x", "answers": [" "]},
        {"prompt": "x", "max_new_tokens": 10_000},
        {"prompt": "x", "answers": ["a"] * 17},
        {"prompt": "x", "temperature": 1.0},
    ],
)
def test_bad_queries_are_refused(client: httpx.Client, body: dict[str, Any]) -> None:
    assert client.post("/v1/query", json=body).status_code == 422


def test_query_while_the_model_loads_is_unavailable(client: httpx.Client, view: RealView) -> None:
    view.not_ready = ["model: loading"]
    answer = client.post("/v1/query", json={"prompt": "x"})
    assert (answer.status_code, answer.json()) == (503, {"detail": "model: still loading"})


def test_commits_status_and_revert(client: httpx.Client, view: RealView) -> None:
    client.post("/v1/facts", json={"facts": [FACT, {"prompt": "The CEO of Acme is", "target_new": "Jane Roe"}]})
    assert view.commit_pending() == 1
    client.post("/v1/facts", json={"facts": [{"prompt": "Peru speaks", "target_new": "Quechua"}]})
    assert view.commit_pending() == 2
    commits = client.get("/v1/commits", params={"limit": 5}).json()["commits"]
    assert [(c["version"], len(c["fact_ids"]), c["reverted_by"]) for c in commits] == [(2, 1, None), (1, 2, None)]
    status = client.get("/v1/status").json()
    assert status["ledger"]["model_version"] == 2
    assert status["ledger"]["facts"]["committed"] == 3
    assert status["ledger"]["last_commit"]["version"] == 2
    assert status["ledger"]["sources"][0]["name"] == "api"

    assert client.post("/v1/revert", json={"last": 1, "to_version": 0}).status_code == 422
    reverted = client.post("/v1/revert", json={"last": 1, "reason": "wrong"})
    assert reverted.status_code == 200, reverted.text
    assert {k: reverted.json()[k] for k in ("from_version", "to_version", "reverted_commits", "reverted_facts")} == {
        "from_version": 2, "to_version": 1, "reverted_commits": 1, "reverted_facts": 1,
    }
    assert client.post("/v1/revert", json={"to_version": 1}).status_code == 409
    assert client.post("/v1/revert", json={"to_version": 7}).status_code == 409
    assert client.post("/v1/query", json={"prompt": "x", "max_new_tokens": 0}).json()["model_version"] == 1
    assert [f["status"] for f in client.get("/v1/facts").json()["facts"]] == ["committed", "committed", "reverted"]


def test_metrics_endpoint_labels_routes_by_template(client: httpx.Client) -> None:
    for fact_id in (1, 2, 3):
        client.get(f"/v1/facts/{fact_id}")
    client.get("/no/such/path")
    scrape = client.get("/metrics")
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    text = scrape.text
    assert 'ked_http_requests_total{code="404",method="GET",route="/v1/facts/{fact_id}"} 3.0' in text
    assert 'route="unmatched"' in text
    assert "/v1/facts/1" not in text
    assert "ked_process_resident_memory_bytes" in text


def test_metrics_can_be_switched_off(view: RealView, serve_api: Callable[..., HttpServer]) -> None:
    from daemon.config import MetricsConfig

    metrics = Metrics(CollectorRegistry(), MetricsConfig(enabled=False, recent_commits=5))
    server = serve_api(view, metrics)
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/metrics").status_code == 404
        assert http.get("/healthz").status_code == 200


# --- the OpenAPI schema, checked by property-based tests against the running app -------------------

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, tiny_lm: tuple[Any, Any]) -> Iterator[Any]:
    """The schema served by a running app over a real ledger holding facts and two commits."""
    from tests.daemon.conftest import _ledger

    metrics = Metrics(CollectorRegistry())
    view = RealView(_ledger(tmp_path_factory.mktemp("schema")), tiny_lm, metrics)
    for batch in ([FACT], [{"prompt": "The CEO of Acme is", "target_new": "Jane Roe"}]):
        view.submit_facts(json.dumps({"facts": batch}).encode(), origin="test")
        view.commit_pending()
    view.submit_facts(json.dumps({"facts": [{"prompt": "Peru speaks", "target_new": "Quechua"}]}).encode(), origin="test")
    config = ApiConfig.model_validate(
        {"port": 0, "token": TOKEN, "rate_limit_per_second": 10_000, "rate_limit_burst": 10_000, "max_facts_per_request": 20,
         "max_new_tokens": 8}
    )
    from daemon.api import create_app

    with HttpServer(create_app(config, view, metrics), config) as server:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")


#: Every operation of the API; a test checks that the served schema has exactly these.
OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/status"),
    ("GET", "/v1/facts"),
    ("POST", "/v1/facts"),
    ("GET", "/v1/facts/{fact_id}"),
    ("GET", "/v1/commits"),
    ("POST", "/v1/query"),
    ("POST", "/v1/revert"),
]
WITH_INPUT = {op for op in OPERATIONS if op[0] == "POST" or op[1] in ("/v1/facts", "/v1/facts/{fact_id}", "/v1/commits")}


def test_the_schema_has_every_operation(api_schema: Any) -> None:
    served = {(method.upper(), path) for path in api_schema for method in api_schema[path]}
    assert served == set(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_conforms_to_the_schema(api_schema: Any, method: str, path: str, mode: GenerationMode) -> None:
    """Generated requests (valid ones, and for operations with inputs invalid ones) get answers the schema allows."""
    if mode is GenerationMode.NEGATIVE and (method, path) not in WITH_INPUT:
        return
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})

    check()
