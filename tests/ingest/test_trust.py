"""Trust at ingest: default policies by kind of source, `off`, ranks and limits from config, protected facts."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ingest import rss
from ingest.config import FeedSource, IngestConfig, JsonlSource, SourceTrust, WebJsonSource
from ingest.dropfolder import DropFolder
from ingest.trust import ProtectedFactsError, load_protected, trust_rules
from store.models import Fact, FactStatus, HoldReason, Rejection
from store.trust import Policy
from tests.ingest.conftest import DATA, Route, WebServer


def statuses(factory: sessionmaker[Session]) -> list[tuple[str, FactStatus, HoldReason | None]]:
    with factory() as session:
        return [(f.target_new, f.status, f.hold_reason) for f in session.scalars(select(Fact).order_by(Fact.id))]


def test_default_policies_review_urls_and_trust_local_inputs() -> None:
    config = IngestConfig(
        jsonl=(JsonlSource(name="local", location="facts.jsonl"), JsonlSource(name="remote", location="https://x.org/f")),
        feeds=(FeedSource(name="wire", url="https://x.org/rss", rank=3),),
        web=(WebJsonSource(name="api2", url="https://x.org/j", policy="auto", max_pending=5),),
        api_trust=SourceTrust(policy="review"),
    )
    rules = trust_rules(config)
    policies = {name: rule.policy for name, rule in rules.sources.items()}
    assert policies == {
        "inbox": Policy.AUTO,
        "api": Policy.REVIEW,
        "cli": Policy.AUTO,
        "jsonl:local": Policy.AUTO,
        "jsonl:remote": Policy.REVIEW,
        "feed:wire": Policy.REVIEW,
        "web:api2": Policy.AUTO,
    }
    assert rules.sources["feed:wire"].rank == 3 and rules.sources["web:api2"].max_pending == 5


def test_a_policy_that_does_not_exist_is_a_clear_configuration_error() -> None:
    with pytest.raises(ValidationError) as caught:
        IngestConfig.model_validate({"feeds": [{"name": "wire", "url": "https://x.org/rss", "policy": "trusted"}]})
    text = str(caught.value)
    assert "feeds.0.policy" in text and "'auto', 'review' or 'off'" in text


def test_feed_facts_wait_for_review_by_default(
    web: WebServer, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    web.routes["/f.rss"] = Route((DATA / "feeds" / "facts.rss").read_bytes(), content_type="application/xml")
    result = rss.poll(FeedSource(name="wire", url=web.url("/f.rss")), ingest_config, ledger)
    assert (result.tally.accepted, result.tally.held) == (2, 2)
    assert statuses(ledger) == [("Strelsau", FactStatus.HELD, HoldReason.REVIEW), ("Jane Roe", FactStatus.HELD, HoldReason.REVIEW)]


def test_policy_off_records_rejections_and_no_facts(
    web: WebServer, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    web.routes["/f.rss"] = Route((DATA / "feeds" / "facts.rss").read_bytes(), content_type="application/xml")
    source = FeedSource(name="wire", url=web.url("/f.rss"), policy="off")
    config = ingest_config.model_copy(update={"feeds": (source,)})
    result = rss.poll(source, config, ledger)
    assert result.tally.accepted == 0 and statuses(ledger) == []
    with ledger() as session:
        reasons = [r.reason for r in session.scalars(select(Rejection).order_by(Rejection.id))]
    assert reasons.count("source feed:wire has policy off: its facts are not edited (docs/trust.md)") == 2


def test_drop_folder_is_auto_and_a_protected_prompt_is_held(
    tmp_path: Path, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    protected = tmp_path / "protected.jsonl"
    protected.write_text('# the operator\'s truths\n{"prompt": "The CEO of Acme is", "answer": "Jane Roe"}\n')
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jsonl").write_text(
        '{"prompt": "The CEO of  Acme is", "target_new": "John Doe"}\n{"prompt": "Paris is in", "target_new": "Texas"}\n'
    )
    config = ingest_config.model_copy(update={"protected_facts": protected, "settle_seconds": 0})
    folder = DropFolder(inbox, config, ledger)
    folder.scan()
    folder.scan()
    assert statuses(ledger) == [("John Doe", FactStatus.HELD, HoldReason.PROTECTED), ("Texas", FactStatus.PENDING, None)]
    with ledger() as session:
        note = session.scalars(select(Fact.last_error).where(Fact.target_new == "John Doe")).one()
    assert note is not None and f"{protected} line 2" in note


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"prompt": "a", "answer": "b"}\nnot json\n', "line 2: not a JSON object"),
        ('{"prompt": "a"}\n', "line 1: expected"),
        ('{"prompt": "a", "answer": "b", "extra": 1}\n', "line 1: expected"),
        ('{"prompt": "a", "answer": ""}\n', "line 1: answer must be text"),
        ('{"prompt": "a", "answer": "b"}\n\n{"prompt": " a ", "answer": "c"}\n', "line 3: the prompt ' a ' is protected already on line 1"),
    ],
)
def test_malformed_protected_facts_file_names_the_file_and_line(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "protected.jsonl"
    path.write_text(content)
    with pytest.raises(ProtectedFactsError, match=f"protected facts file {path} {problem}"):
        load_protected(path)


def test_missing_protected_facts_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProtectedFactsError, match=f"protected facts file {tmp_path / 'nope.jsonl'}: cannot read"):
        load_protected(tmp_path / "nope.jsonl")


def test_a_url_imported_from_the_command_line_waits_for_review_and_a_file_does_not(
    tmp_path: Path, web: WebServer, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    from ingest.inputs import import_inputs

    line = b'{"prompt": "The CEO of Acme is", "target_new": "Jane Roe"}\n'
    web.routes["/f.jsonl"] = Route(line.replace(b"Acme", b"Initech"), content_type="application/x-ndjson")
    local = tmp_path / "facts.jsonl"
    local.write_bytes(line)
    tally, all_read = import_inputs([str(local), web.url("/f.jsonl")], ingest_config, ledger)
    assert all_read and (tally.accepted, tally.held) == (2, 1)
    assert statuses(ledger) == [("Jane Roe", FactStatus.PENDING, None), ("Jane Roe", FactStatus.HELD, HoldReason.REVIEW)]
    trusted = ingest_config.model_copy(update={"cli_trust": SourceTrust(policy="auto")})
    web.routes["/g.jsonl"] = Route(line.replace(b"Acme", b"Hooli"), content_type="application/x-ndjson")
    tally, _ = import_inputs([web.url("/g.jsonl")], trusted, ledger)
    assert (tally.accepted, tally.held) == (1, 0)
