"""Inputs imported once (`python -m ingest FILE_OR_URL...`): read each file or URL, record its facts and rejections.

Every input ends as facts or recorded rejections (source `cli`, location the resolved path or the
URL): one that cannot be read at all (a missing file, a failed fetch) is a rejection too, and
`import_inputs` says so. The command around it (arguments, settings, the summary) is
`daemon.commands.ingest`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from ingest.config import IngestConfig
from ingest.documents import no_records_reason, read_document, safe_excerpt
from ingest.errors import DocumentError, FetchError
from ingest.facts import Outcome, document_rejection, to_outcomes
from ingest.fetch import fetch
from ingest.recording import Tally, record_outcomes
from ingest.trust import polled_rules
from store import intake

#: Ledger source name of facts imported once from the command line.
SOURCE_NAME = "cli"


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
                                   reason=no_records_reason(name, data))], True
    return to_outcomes(records, source=SOURCE_NAME, location=location, limits=config.limits), True


def import_inputs(items: Sequence[str], config: IngestConfig, factory: sessionmaker[Session]) -> tuple[Tally, bool]:
    """Import every input, committing every `commit_every` records. Returns the tally and whether all were read."""
    tally, all_read = Tally(), True
    # an imported URL is a fetched source: it waits for review unless [ingest.cli_trust] sets a policy
    rules = {fetched: polled_rules(config, SOURCE_NAME, config.cli_trust, fetched=fetched) for fetched in (False, True)}
    with factory.begin() as session:
        intake.ensure_source(session=session, name=SOURCE_NAME, kind="cli", location="python -m ingest")
    for item in items:
        outcomes, was_read = outcomes_of(item, config)
        all_read = all_read and was_read
        for start in range(0, len(outcomes), config.commit_every):
            with factory.begin() as session:
                tally.add(record_outcomes(session, outcomes[start : start + config.commit_every], rules[is_url(item)]))
    return tally, all_read
