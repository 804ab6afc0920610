"""RSS and Atom feeds served by a real loopback server, parsed by the real feedparser."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ingest import rss
from ingest.config import FeedMapping, FeedSource, IngestConfig
from store import intake
from store.models import Fact
from tests.ingest.conftest import DATA, Route, WebServer, counts, rejection_reasons

FEEDS = DATA / "feeds"
LEADERS = FeedMapping(mode="title_regex", pattern=r"(?P<subject>.+) is now led by (?P<target_new>.+)",
                      prompt_template="{subject} is led by")


def serve(web: WebServer, name: str, **route: object) -> str:
    web.routes[f"/{name}"] = Route((FEEDS / name).read_bytes(), content_type="application/xml", **route)  # type: ignore[arg-type]
    return web.url(f"/{name}")


def facts(factory: sessionmaker[Session]) -> list[tuple[str, str, datetime | None]]:
    with factory() as session:
        return [(f.prompt, f.target_new, f.observed_at) for f in session.scalars(select(Fact).order_by(Fact.id))]


def test_json_entries_oldest_first_with_times_and_rejections(
    web: WebServer, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    source = FeedSource(name="wire", url=serve(web, "facts.rss"))
    result = rss.poll(source, ingest_config, ledger)
    assert (result.failure, result.tally.accepted, result.tally.rejected) == (None, 2, 1)
    assert facts(ledger) == [
        ("The capital of Ruritania is", "Strelsau", datetime(2026, 11, 21, 10, tzinfo=UTC)),
        ("The CEO of Acme is", "Jane Roe", datetime(2026, 11, 21, 12, tzinfo=UTC)),
    ]
    assert rejection_reasons(ledger) == [("entry fact-2", "target_new: must not be empty or whitespace")]


def test_title_regex_mapping_and_seen_entries_are_skipped(
    web: WebServer, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    source = FeedSource(name="leaders", url=serve(web, "leaders.atom"), mapping=LEADERS)
    first = rss.poll(source, ingest_config, ledger)
    assert (first.tally.accepted, first.tally.rejected) == (2, 1)
    assert [(p, t) for p, t, _ in facts(ledger)] == [("Acme is led by", "Jane Roe"), ("Globex is led by", "Hank Scorpio")]
    assert rejection_reasons(ledger) == [
        ("entry urn:test:leaders:2",
         "title: does not match the feed's pattern '(?P<subject>.+) is now led by (?P<target_new>.+)'")]
    # no ETag on this route: the feed is fetched again, and every entry is already seen
    second = rss.poll(source, ingest_config, ledger)
    assert (second.tally.accepted, second.tally.rejected, second.not_modified) == (0, 0, False)
    assert counts(ledger) == (2, 2, 1)


def test_conditional_get_with_stored_validators(
    web: WebServer, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    source = FeedSource(name="wire", url=serve(web, "facts.rss", etag='"e1"',
                                                last_modified="Sat, 21 Nov 2026 12:00:00 GMT"))
    rss.poll(source, ingest_config, ledger)
    again = rss.poll(source, ingest_config, ledger)
    assert again.not_modified and web.requests[-1][1]["If-None-Match"] == '"e1"'
    assert web.requests[-1][1]["If-Modified-Since"] == "Sat, 21 Nov 2026 12:00:00 GMT"
    with ledger() as session:
        row = intake.get_source(session=session, name="feed:wire")
        assert row is not None and (row.etag, row.consecutive_failures) == ('"e1"', 0)


def test_facts_per_poll_limit_takes_the_rest_next_time(web: WebServer, ledger: sessionmaker[Session]) -> None:
    config = IngestConfig(settle_seconds=0, limits={"max_facts_per_poll": 1})  # type: ignore[arg-type]
    source = FeedSource(name="wire", url=serve(web, "facts.rss", etag='"e1"'))
    polls = [rss.poll(source, config, ledger) for _ in range(4)]
    assert [(p.tally.accepted, p.tally.rejected, p.not_modified) for p in polls] == [
        (1, 0, False), (0, 1, False), (1, 0, False), (0, 0, True)]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("billion_laughs.rss", "feed: declares an XML entity (utf-8); entity declarations are refused"),
        ("xxe.rss", "feed: declares an XML entity (utf-8); entity declarations are refused"),
        ("xxe_utf16.rss", "feed: declares an XML entity (utf-16-le); entity declarations are refused"),
        ("malformed.rss", "feed: malformed XML: <unknown>:5:0: no element found"),
        ("not_a_feed.html", "feed: not an RSS or Atom feed (no feed elements found)"),
    ],
)
def test_bad_feeds_are_recorded_once_and_fail_the_poll(
    name: str, reason: str, web: WebServer, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    source = FeedSource(name="bad", url=serve(web, name), mapping=LEADERS)
    first = rss.poll(source, ingest_config, ledger)
    second = rss.poll(source, ingest_config, ledger)
    assert first.failure == reason and second.failure == reason
    assert rejection_reasons(ledger) == [(None, reason)]  # once, not once per poll
    assert counts(ledger)[0] == 0
    with ledger() as session:
        row = intake.get_source(session=session, name="feed:bad")
        assert row is not None and (row.consecutive_failures, row.last_error) == (2, reason)


def test_external_dtd_is_not_fetched(web: WebServer, ingest_config: IngestConfig,
                                     ledger: sessionmaker[Session]) -> None:
    source = FeedSource(name="ext", url=serve(web, "external_dtd.rss"), mapping=LEADERS)
    result = rss.poll(source, ingest_config, ledger)
    assert result.failure is None and [(p, t) for p, t, _ in facts(ledger)] == [("Acme is led by", "Jane Roe")]


def test_unsafe_markup_check() -> None:
    assert rss.unsafe_markup(b'<!DOCTYPE rss PUBLIC "-//Netscape//DTD RSS 0.91//EN" "x.dtd"><rss/>') is None
    assert rss.unsafe_markup(b"<!DOCTYPE rss [ ]><rss/>") == "has a DOCTYPE internal subset; DTD declarations are refused"
