"""`python -m ingest`: import fact files or URLs once into the ledger and print a summary.

Exit codes: 0 the inputs were processed (rejections included); 1 an input could not be read at
all (missing file, failed fetch: listed in the summary and recorded as a rejection); 2 usage or
configuration errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from daemon.config import ConfigError, Settings, add_common_arguments, settings_from_args
from ingest.config import IngestConfig
from ingest.documents import read_document, safe_excerpt
from ingest.errors import DocumentError, FetchError
from ingest.facts import Outcome, document_rejection, to_outcomes
from ingest.fetch import fetch
from ingest.recording import Tally, record_outcomes
from store import intake

SOURCE_NAME = "cli"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest",
        description="Import fact files (JSONL, JSON, .jsonl.gz) or http(s) URLs once into the ledger.",
    )
    add_common_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_URL", help="fact files or http(s) URLs")
    return parser


def is_url(text: str) -> bool:
    """True for http(s) URLs."""
    return urlsplit(text).scheme in ("http", "https")


def _read_input(item: str, config: IngestConfig) -> tuple[bytes, str, str | None]:
    """(bytes, name for format detection, content type). Raises FetchError or OSError."""
    if is_url(item):
        response = fetch(item, config.http, max_bytes=config.limits.max_fetch_bytes)
        return response.body, urlsplit(response.url).path, response.content_type
    path = Path(item)
    with path.open("rb") as handle:
        data = handle.read(config.limits.max_file_bytes + 1)
    if len(data) > config.limits.max_file_bytes:
        raise DocumentError(f"file is larger than {config.limits.max_file_bytes} bytes (ingest.limits.max_file_bytes)")
    return data, path.name, None


def outcomes_of(item: str, config: IngestConfig) -> tuple[list[Outcome], bool]:
    """The outcomes of one input, and whether it could be read at all."""
    location = item if is_url(item) else str(Path(item).resolve())
    try:
        data, name, content_type = _read_input(item, config)
    except (FetchError, OSError) as exc:
        reason = f"input: cannot read: {exc}" if isinstance(exc, FetchError) else f"input: cannot read: {exc.strerror}"
        return [document_rejection(source=SOURCE_NAME, location=location, excerpt="", reason=reason)], False
    except DocumentError as exc:
        return [document_rejection(source=SOURCE_NAME, location=location, excerpt="", reason=f"file: {exc}")], True
    try:
        records = read_document(data, name=name, limits=config.limits, content_type=content_type)
    except DocumentError as exc:
        return [document_rejection(source=SOURCE_NAME, location=location, excerpt=safe_excerpt(data),
                                   reason=f"file: {exc}")], True
    if not records:
        return [document_rejection(source=SOURCE_NAME, location=location, excerpt="",
                                   reason="file: contains no records")], True
    return to_outcomes(records, source=SOURCE_NAME, location=location, limits=config.limits), True


def import_inputs(items: Sequence[str], config: IngestConfig, factory: sessionmaker[Session]) -> tuple[Tally, bool]:
    """Import every input, committing every `commit_every` records. Returns the tally and whether all were read."""
    tally, all_read = Tally(), True
    with factory.begin() as session:
        intake.ensure_source(session=session, name=SOURCE_NAME, kind="cli", location="python -m ingest")
    for item in items:
        outcomes, was_read = outcomes_of(item, config)
        all_read = all_read and was_read
        for start in range(0, len(outcomes), config.commit_every):
            with factory.begin() as session:
                tally.add(record_outcomes(session, outcomes[start : start + config.commit_every]))
    return tally, all_read


def summary(tally: Tally) -> dict[str, Any]:
    """The summary printed by the command (the --json form)."""
    return {
        "accepted": tally.accepted,
        "duplicates": tally.duplicates,
        "rejected": tally.rejected,
        "errors": [
            {
                "origin": {"source": r.origin.source, "location": r.origin.location, "position": r.origin.position},
                "reason": r.reason,
            }
            for r in tally.rejections
        ],
    }


def format_summary(tally: Tally) -> str:
    """The human-readable summary: counts, then one line per rejection."""
    lines = [f"accepted: {tally.accepted}", f"duplicates: {tally.duplicates}", f"rejected: {tally.rejected}"]
    for r in tally.rejections:
        where = r.origin.location + (f" {r.origin.position}" if r.origin.position else "")
        lines.append(f"  {where}: {r.reason}")
    return "\n".join(lines) + "\n"


def _open_ledger(settings: Settings) -> sessionmaker[Session]:
    from store.db import make_engine, make_session_factory, upgrade_to_head

    engine = make_engine(settings.ledger_url(), sqlite_busy_timeout_ms=settings.store.sqlite_busy_timeout_ms)
    upgrade_to_head(engine)
    return make_session_factory(engine)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m ingest`."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"python -m ingest: {exc}", file=sys.stderr)
        return 2
    from daemon.logs import configure_logging

    configure_logging(settings.logging, stream=sys.stderr)  # stdout carries the summary
    tally, all_read = import_inputs(args.inputs, settings.ingest, _open_ledger(settings))
    out = json.dumps(summary(tally), ensure_ascii=False) + "\n" if args.json else format_summary(tally)
    sys.stdout.write(out)
    return 0 if all_read else 1
