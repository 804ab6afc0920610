"""Trust end to end: an RSS feed from this test's own HTTP server, its facts held for review, approved
through the HTTP API, committed by the edit loop; a protected fact that survives a batch that would change it.

Real parts: the feed is served over loopback HTTP and polled by ingest's own poll job (`SourceJob`
around `ingest.rss.poll`) with the configured sources; a SQLite ledger and artefact store; the tiny
Llama and an untrained EMSEdit editor in the edit loop with the real gate (thresholds that pass
everything, so that only the protected-facts check can refuse); the HTTP API with the write token
and the review routes. Behaviour checked does not depend on real weights: answers are compared with
themselves before and after.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from daemon.api import create_app
from daemon.config import ApiConfig, EditLoopConfig
from daemon.http_server import HttpServer
from daemon.review import ANSWER_TOKENS, ReviewDesk
from editing.gate.checks import PROTECTED_REASON
from ingest.config import FeedSource
from ingest.polling import ledger_name
from ingest.scheduling import SourceJob
from store.models import Fact
from tests.daemon.test_edit_loop import EDITOR, STRONG_EDIT_LR, World, make_rig
from tests.daemon.test_model_state import tiny_model_dir_fixture, world_fixture, worlds_fixture

__all__ = ["tiny_model_dir_fixture", "world_fixture", "worlds_fixture"]

TOKEN = "trust-e2e-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROTECTED_PROMPT = "The capital of country 0 is"


def item(guid: str, prompt: str, target: str) -> str:
    body = f'{{"prompt": "{prompt}", "target_new": "{target}"}}'
    return f"<item><title>{guid}</title><guid isPermaLink=\"false\">{guid}</guid><description><![CDATA[{body}]]></description></item>"


def feed(*items: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>wire</title>'
        "<link>http://127.0.0.1/</link><description>facts</description>" + "".join(items) + "</channel></rss>"
    ).encode()


class Feed:
    """A real RSS endpoint on loopback whose body the test replaces between polls."""

    def __init__(self) -> None:
        self.body = feed()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/rss+xml")
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/wire.rss"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def wire() -> Iterator[Feed]:
    served = Feed()
    yield served
    served.close()


def test_feed_facts_wait_for_review_then_commit_and_a_protected_fact_survives(
    world: World, wire: Feed, tmp_path: Path
) -> None:
    # The operator's truth: the protected prompt keeps the answer the model gives now.
    protected_file = tmp_path / "protected.jsonl"
    protected_file.write_text(f'{{"prompt": "{PROTECTED_PROMPT}", "answer": "Rome"}}\n')
    source = FeedSource(name="wire", url=wire.url, interval_seconds=60)  # no policy set: a URL source waits for review
    ingest = world.settings.ingest.model_copy(update={"feeds": (source,), "protected_facts": protected_file})
    settings = world.settings.model_copy(update={"ingest": ingest})
    trusted = World(world.root, settings, world.engine, world.sessions)
    strong = EDITOR.model_copy(update={"edit_lr": STRONG_EDIT_LR})
    rig = make_rig(trusted, edit_loop=EditLoopConfig(min_batch=1, max_wait_seconds=0), editor=strong)
    job = SourceJob(ledger_name("feed", "wire"), lambda: _poll(source, settings, world), interval=60,
                    config=ingest, session_factory=world.sessions)
    view = rig.view
    config = ApiConfig.model_validate({"port": 0, "token": TOKEN, "rate_limit_per_second": 1000, "rate_limit_burst": 1000})

    def answer(prompt: str) -> str:
        return view.query(prompt, (), ANSWER_TOKENS).completion.strip()

    prompts = ["Lionel Messi plays the sport of", "Bananas are coloured", PROTECTED_PROMPT]
    before = {p: answer(p) for p in prompts}
    base_hash = rig.loop.history.state.weights_sha256()
    check = rig.loop.gated.checker.protected if rig.loop.gated else None
    assert check is not None
    protected_before = check.answers(rig.loop.loaded.model, rig.loop.loaded.tokenizer)

    with HttpServer(create_app(config, view, rig.metrics, ReviewDesk(world.sessions, answer, rig.metrics)), config) as server, \
            httpx.Client(base_url=server.url, timeout=60) as api:
        # 1. The feed's facts are polled and wait in review; the edit loop edits nothing; answers do not change.
        wire.body = feed(item("a", prompts[0], "tennis"), item("b", prompts[1], "blue"))
        result = job()
        assert result is not None and result.failure is None and (result.tally.accepted, result.tally.held) == (2, 2)
        rig.loop.tick()
        queue = api.get("/v1/review", params={"answers": "true"}, headers=AUTH).json()
        # (a feed lists newest first; entries without dates are taken oldest first, so "b" arrived first)
        assert sorted((h["prompt"], h["target_new"], h["source"], h["hold_reason"]) for h in queue["held"]) == [
            (prompts[1], "blue", "feed:wire", "review"), (prompts[0], "tennis", "feed:wire", "review"),
        ]
        assert {h["prompt"]: h["model_answer"] for h in queue["held"]} == {p: before[p] for p in prompts[:2]}
        assert rig.loop.history.state.version == 0 and rig.loop.history.state.weights_sha256() == base_hash
        assert {p: answer(p) for p in prompts} == before

        # 2. Approval (through the API, behind the token) makes them pending; the loop commits them.
        approved = api.post("/v1/review/approve", json={"filter": {"source": "feed:wire"}, "reviewer": "alice"}, headers=AUTH)
        assert approved.status_code == 200 and len(approved.json()["decided"]) == 2
        rig.loop.tick()
        assert rig.loop.history.state.version == 1
        assert set(rig.statuses().values()) == {"committed"}
        assert answer(prompts[0]) != before[prompts[0]] or answer(prompts[1]) != before[prompts[1]]

        # 3. A feed fact on the protected prompt is held as protected; approved by mistake with an innocent
        #    fact, the gate bisects the batch: the culprit is rejected with the reason, the innocent commits,
        #    and the protected fact's answer survives.
        wire.body = feed(item("c", PROTECTED_PROMPT, "Paris 0"), item("d", "Grass is coloured", "red"))
        assert job() is not None
        held = {h["prompt"]: h for h in api.get("/v1/review", headers=AUTH).json()["held"]}
        assert held[PROTECTED_PROMPT]["hold_reason"] == "protected"
        assert str(protected_file) in held[PROTECTED_PROMPT]["note"]
        protected_answer = answer(PROTECTED_PROMPT)
        ids = sorted(h["id"] for h in held.values())
        assert api.post("/v1/review/approve", json={"filter": {"ids": ids}, "reason": "looks fine"}, headers=AUTH).status_code == 200
        rig.loop.tick()
        with world.sessions() as session:
            rows = {f.prompt: f for f in session.scalars(select(Fact).where(Fact.id.in_(ids)))}
        culprit, innocent = rows[PROTECTED_PROMPT], rows["Grass is coloured"]
        assert culprit.status.value == "rejected" and innocent.status.value == "committed"
        assert (culprit.last_error or "").startswith(PROTECTED_REASON)
        assert f"'{PROTECTED_PROMPT}' -> 'Rome', {protected_file} line 1" in (culprit.last_error or "")
        assert check.answers(rig.loop.loaded.model, rig.loop.loaded.tokenizer) == protected_before
        assert answer(PROTECTED_PROMPT) == protected_answer
        assert rig.metric("ked_protected_fact_violations_total") == 1
        # the audit trail of the culprit: held as protected, approved by the API client, then rejected by the gate
        detail = api.get(f"/v1/facts/{culprit.id}").json()
        assert [(r["action"], r["hold_reason"], r["reason"]) for r in detail["reviews"]] == [
            ("approved", "protected", "looks fine")
        ]


def _poll(source: FeedSource, settings: Any, world: World) -> Any:
    from ingest import rss

    return rss.poll(source, settings.ingest, world.sessions)
