"""Web JSON endpoints on a loopback server: lists, {"facts": [...]}, unchanged bodies, bad bodies."""

from __future__ import annotations

import json

from sqlalchemy.orm import Session, sessionmaker

from ingest import web as web_source
from ingest.config import IngestConfig, WebJsonSource
from tests.ingest.conftest import Route, WebServer, counts, rejection_reasons


def facts(*numbers: int) -> list[dict[str, str]]:
    return [{"prompt": f"The owner of shop {i} is", "target_new": f"Owner {i}"} for i in numbers]


def test_list_body_then_unchanged_body_is_not_recorded_again(
    web: WebServer, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    web.routes["/facts"] = Route(json.dumps(facts(1, 2)).encode(), content_type="application/json")
    source = WebJsonSource(name="shop", url=web.url("/facts"))
    assert web_source.poll(source, ingest_config, ledger).tally.accepted == 2
    again = web_source.poll(source, ingest_config, ledger)  # no validators: fetched, same body, skipped
    assert (again.tally.accepted, again.tally.duplicates) == (0, 0)
    assert counts(ledger) == (2, 2, 0)


def test_facts_object_with_a_bad_item(web: WebServer, ingest_config: IngestConfig,
                                      ledger: sessionmaker[Session]) -> None:
    body = {"facts": [*facts(1), {"prompt": "p", "target_new": "x", "ground_truth": "X"}, *facts(2)]}
    web.routes["/api"] = Route(json.dumps(body).encode(), etag='"a"')
    source = WebJsonSource(name="api", url=web.url("/api"))
    result = web_source.poll(source, ingest_config, ledger)
    assert (result.tally.accepted, result.tally.rejected, result.failure) == (2, 1, None)
    assert rejection_reasons(ledger) == [("item 2", "target_new: equals ground_truth 'X'; nothing to edit")]
    assert web_source.poll(source, ingest_config, ledger).not_modified


def test_bad_body_is_recorded_once_and_fails_the_poll(
    web: WebServer, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    web.routes["/broken"] = Route(b"<html>oops</html>", etag='"same"')
    source = WebJsonSource(name="broken", url=web.url("/broken"))
    results = [web_source.poll(source, ingest_config, ledger) for _ in range(2)]
    reason = "body of /broken: invalid JSON: Expecting value at line 1 column 1"
    assert [r.failure for r in results] == [reason, reason]
    assert rejection_reasons(ledger) == [(None, reason)]


def test_limit_spreads_a_large_body_over_polls(web: WebServer, ledger: sessionmaker[Session]) -> None:
    config = IngestConfig(limits={"max_facts_per_poll": 2})  # type: ignore[arg-type]
    web.routes["/many"] = Route(json.dumps(facts(1, 2, 3)).encode(), etag='"m"')
    source = WebJsonSource(name="many", url=web.url("/many"))
    polls = [web_source.poll(source, config, ledger) for _ in range(3)]
    assert [(p.tally.accepted, p.not_modified) for p in polls] == [(2, False), (1, False), (0, True)]
