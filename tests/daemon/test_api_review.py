"""The review queue through the HTTP API: a real SQLite ledger, a real tiny model, real HTTP, the write token."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from daemon.api import create_app
from daemon.config import ApiConfig
from daemon.http_server import HttpServer
from daemon.metrics import Metrics
from daemon.review import ANSWER_TOKENS, ReviewDesk
from store import intake
from store.models import Fact, FactStatus
from store.records import FactIn, Origin
from store.trust import Policy, SourceRule, TrustRules
from tests.daemon.conftest import RealView

TOKEN = "review-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RULES = TrustRules(sources={"feed:wire": SourceRule(policy=Policy.REVIEW)})


@pytest.fixture
def view(make_ledger: Callable[[], Any], tiny_lm: tuple[Any, Any], fresh_metrics: Metrics) -> RealView:
    view = RealView(make_ledger(), tiny_lm, fresh_metrics)
    with view.sessions.begin() as session:
        items = [
            (FactIn(prompt="The CEO of Acme is", target_new="John Doe"), Origin("feed:wire", "https://w/a.rss", "entry 1")),
            (FactIn(prompt="Paris is in", target_new="Texas"), Origin("feed:wire", "https://w/a.rss", "entry 2")),
            (FactIn(prompt="Oslo is in", target_new="Sweden"), Origin("feed:wire", "https://w/b.rss", "entry 1")),
            (FactIn(prompt="Rome is in", target_new="Italy"), Origin("inbox", "x.jsonl", "line 1")),
        ]
        intake.add_facts(session=session, items=items, rules=RULES)
    return view


@pytest.fixture
def client(view: RealView, fresh_metrics: Metrics) -> Iterator[httpx.Client]:
    config = ApiConfig.model_validate({"port": 0, "token": TOKEN, "rate_limit_per_second": 1000, "rate_limit_burst": 1000})

    def answer(prompt: str) -> str:
        return view.query(prompt, (), ANSWER_TOKENS).completion.strip()

    app = create_app(config, view, fresh_metrics, ReviewDesk(view.sessions, answer))
    with HttpServer(app, config) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def statuses(view: RealView) -> list[FactStatus]:
    with view.sessions() as session:
        return [f.status for f in session.scalars(select(Fact).order_by(Fact.id))]


def test_the_queue_lists_held_facts_with_the_models_answer(client: httpx.Client, view: RealView) -> None:
    assert client.get("/v1/review").status_code == 401  # behind the write token
    listed = client.get("/v1/review", params={"answers": "true"}, headers=AUTH).json()
    assert [h["id"] for h in listed["held"]] == [1, 2, 3]
    first = listed["held"][0]
    assert (first["source"], first["location"], first["position"], first["hold_reason"]) == (
        "feed:wire", "https://w/a.rss", "entry 1", "review",
    )
    expected = view.query("The CEO of Acme is", (), ANSWER_TOKENS).completion.strip()
    assert first["model_answer"] == expected and first["target_new"] == "John Doe"
    assert listed["queue"]["held"] == 3 and listed["queue"]["by_source"] == {"feed:wire": {"review": 3}}
    only_b = client.get("/v1/review", params={"origin": "https://w/b.rss"}, headers=AUTH).json()
    assert [h["id"] for h in only_b["held"]] == [3] and only_b["held"][0]["model_answer"] is None


def test_approve_one_reject_in_bulk_and_the_audit_trail(client: httpx.Client, view: RealView) -> None:
    done = client.post("/v1/facts/1/approve", json={"reason": "checked", "reviewer": "alice"}, headers=AUTH)
    assert done.status_code == 200 and done.json() == {"action": "approved", "decided": [1], "skipped": [], "superseded": []}
    bulk = client.post(
        "/v1/review/reject", json={"filter": {"source": "feed:wire", "prompt_contains": "is in"}, "reason": "hoax"},
        headers=AUTH,
    )
    assert bulk.json()["decided"] == [2, 3]
    assert statuses(view) == [FactStatus.PENDING, FactStatus.REJECTED, FactStatus.REJECTED, FactStatus.PENDING]
    detail = client.get("/v1/facts/1").json()
    assert [(r["action"], r["reviewer"], r["reason"], r["hold_reason"]) for r in detail["reviews"]] == [
        ("approved", "api:alice", "checked", "review")
    ]
    rejected = client.get("/v1/facts/2").json()
    assert rejected["reviews"][0]["reviewer"] == "api:127.0.0.1" and rejected["last_error"] == "rejected by api:127.0.0.1: hoax"


@pytest.mark.parametrize(
    ("path", "body", "code", "message"),
    [
        ("/v1/facts/99/approve", {}, 404, "no fact with id 99"),
        ("/v1/facts/4/approve", {}, 409, "fact 4 is pending"),
        ("/v1/review/approve", {"filter": {"origin": "https://nowhere"}}, 404, "no held fact matches origin"),
        ("/v1/review/approve", {"filter": {"source": "ghost"}}, 404, "no source named 'ghost'"),
        ("/v1/review/approve", {"filter": {}}, 422, "the filter names nothing"),
        ("/v1/review/approve", {"filter": {"held_for": "whim"}}, 422, "held_for"),
    ],
)
def test_bad_decisions_get_clear_errors_and_change_nothing(
    client: httpx.Client, view: RealView, path: str, body: dict[str, Any], code: int, message: str
) -> None:
    answer = client.post(path, json=body, headers=AUTH)
    assert answer.status_code == code and message in str(answer.json()["detail"])
    assert statuses(view).count(FactStatus.HELD) == 3


def test_decisions_need_the_token(client: httpx.Client, view: RealView) -> None:
    assert client.post("/v1/facts/1/approve", json={}).status_code == 401
    assert client.post("/v1/review/approve", json={"filter": {"source": "feed:wire"}}).status_code == 401
    assert statuses(view).count(FactStatus.HELD) == 3
