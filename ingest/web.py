"""Web JSON sources: an endpoint returning a list of facts or `{"facts": [...]}`.

Fetched with conditional GET under the HTTP rules of `ingest.fetch`. The cursor holds the hash of
the last body and how many of its records are recorded, so an unchanged body (even from a server
that ignores ETag and Last-Modified) is not recorded twice, and a body with more than
`max_facts_per_poll` records is taken over several polls. A body that is not a usable JSON
document is recorded once as a rejection and the poll counts as failed.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from ingest.config import IngestConfig, WebJsonSource
from ingest.documents import json_records, safe_excerpt
from ingest.errors import DocumentError
from ingest.facts import Outcome, document_rejection, to_outcomes
from ingest.polling import Poll, commit_poll, conditional_fetch, ledger_name, open_source, unchanged_poll
from ingest.trust import polled_rules

KIND = "web"


def poll(source: WebJsonSource, config: IngestConfig, session_factory: sessionmaker[Session]) -> Poll:
    """Fetch the endpoint and record the records not yet recorded. Raises FetchError when unreachable."""
    state = open_source(session_factory, name=ledger_name(KIND, source.name), kind=KIND, location=source.url)
    response = conditional_fetch(source.url, config, state)
    if response.not_modified:
        return unchanged_poll(session_factory, state)
    digest = hashlib.sha256(response.body).hexdigest()
    done = int(state.cursor.get("done", 0)) if state.cursor.get("digest") == digest else 0
    failure = None
    outcomes: list[Outcome]
    try:
        outcomes = to_outcomes(
            json_records(response.body, config.limits), source=state.name, location=source.url, limits=config.limits
        )
    except DocumentError as exc:
        failure = f"body of {urlsplit(source.url).path or '/'}: {exc}"
        outcomes = [document_rejection(source=state.name, location=source.url,
                                       excerpt=safe_excerpt(response.body), reason=failure)]
    todo = outcomes[done : done + config.limits.max_facts_per_poll]
    finished = done + len(todo) >= len(outcomes)
    # Validators only once the body is fully stored, and never for a bad body (it must keep failing).
    validators = (response.etag, response.last_modified) if finished and failure is None else (None, None)
    cursor = {"digest": digest, "done": done + len(todo)}
    rules = polled_rules(config, state.name, source, fetched=True)
    return commit_poll(session_factory, state, todo, cursor=cursor, validators=validators, failure=failure, rules=rules)
