"""The bad-input corpus (tests/ingest/data/bad, described in its manifest.json): every file goes
through the drop folder into a real ledger; for each one the exact rejection is recorded, the good
records around it are kept, and the file ends where it should (processed/ or rejected/)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ingest.config import IngestConfig, IngestLimits
from ingest.dropfolder import DropFolder, FileResult
from store.db import make_engine, make_session_factory, upgrade_to_head
from store.models import FactOrigin, Rejection
from tests.ingest.conftest import DATA

CORPUS = DATA / "bad"
MANIFEST: dict[str, dict[str, Any]] = json.loads((CORPUS / "manifest.json").read_text())
LIMITS = IngestLimits(
    max_file_bytes=16384, max_line_bytes=4096, max_prompt_chars=200, max_target_chars=100, max_list_items=8,
    max_depth=8,
)


@dataclass
class CorpusRun:
    inbox: Path
    factory: sessionmaker[Session]
    results: dict[str, FileResult]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("corpus")
    inbox = root / "inbox"
    inbox.mkdir()
    for name in MANIFEST:
        shutil.copyfile(CORPUS / name, inbox / name)
    engine = make_engine(f"sqlite:///{root}/l.sqlite3")
    upgrade_to_head(engine)
    factory = make_session_factory(engine)
    results = DropFolder(inbox, IngestConfig(settle_seconds=0, limits=LIMITS), factory).scan()
    yield CorpusRun(inbox, factory, {r.name: r for r in results})
    engine.dispose()


def test_corpus_is_large_enough() -> None:
    assert len(MANIFEST) >= 40
    assert sorted(p.name for p in CORPUS.iterdir() if p.name != "manifest.json") == sorted(MANIFEST)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_bad_input_is_recorded_and_good_data_survives(name: str, corpus: CorpusRun) -> None:
    expected = MANIFEST[name]
    location = str(corpus.inbox / name)
    with corpus.factory() as session:
        rejections = [
            [r.position, r.reason]
            for r in session.scalars(select(Rejection).where(Rejection.location == location).order_by(Rejection.id))
        ]
        kept = session.scalars(select(FactOrigin).where(FactOrigin.location == location)).all()
    assert rejections == expected["rejections"], expected["what"]
    assert len(kept) == expected["accepted"], expected["what"]
    result = corpus.results[name]
    assert result.destination == corpus.inbox / expected["destination"] / name
    assert result.report is not None
    report = json.loads(result.report.read_text())
    assert [[e["position"], e["reason"]] for e in report["errors"]] == expected["rejections"]
