"""RSS 2.0 and Atom feeds: fetched by `ingest.fetch`, parsed by feedparser from the bytes.

Each new entry becomes a fact or a rejection according to the feed's `FeedMapping`:
- mode 'json': the entry's content (or else its summary) is one JSON fact in any accepted shape;
- mode 'title_regex': `pattern` must match the whole title; its named groups fill `prompt_template`
  and give `target_new` (and `subject`, `ground_truth` when present).
The entry's updated/published time is the fact's `observed_at` unless the fact gives one.

Entries are keyed by guid/id, or by link plus updated time; keys already seen (kept in the cursor)
are skipped, oldest entries are taken first, at most `max_facts_per_poll` per poll.

Safety: a feed with a DOCTYPE internal subset or an ENTITY declaration is refused before parsing
(entity expansion and external-entity tricks), in any of the encodings XML allows. A body that
feedparser cannot read as a feed is a failed poll, recorded once per distinct body as a rejection.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import re
from datetime import UTC, datetime
from typing import Any

import feedparser
from sqlalchemy.orm import Session, sessionmaker

from ingest.config import FeedMapping, FeedSource, IngestConfig, IngestLimits
from ingest.documents import parse_line, safe_excerpt
from ingest.errors import RecordError
from ingest.facts import Accepted, Outcome, document_rejection, safe_reason, to_fact
from ingest.fetch import Response
from ingest.polling import Poll, SourceState, commit_poll, conditional_fetch, ledger_name, open_source, unchanged_poll
from ingest.progress import remember
from ingest.trust import polled_rules
from store.records import Origin, RejectionIn

KIND = "feed"
KEEP_SEEN = 5000
_ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
_NO_TIME = datetime.min.replace(tzinfo=UTC)
_MARKERS = tuple((enc, "<!ENTITY".encode(enc), "<!DOCTYPE".encode(enc)) for enc in _ENCODINGS)


def unsafe_markup(body: bytes) -> str | None:
    """Why `body` is refused before parsing (entity declarations, DTD internal subset), or None."""
    for encoding, entity, doctype in _MARKERS:
        if entity in body:
            return f"declares an XML entity ({encoding}); entity declarations are refused"
        start = body.find(doctype)
        if start >= 0:
            end = body.find(">".encode(encoding), start)
            subset = body.find("[".encode(encoding), start)
            if subset >= 0 and (end < 0 or subset < end):
                return "has a DOCTYPE internal subset; DTD declarations are refused"
    return None


def parse_feed(body: bytes, response: Response) -> Any:
    """feedparser's result for `body`; raises RecordError('feed', ...) when it is not a usable feed."""
    reason = unsafe_markup(body)
    if reason:
        raise RecordError("feed", reason)
    headers = {"content-location": response.url}
    if response.content_type:
        headers["content-type"] = response.content_type
    parsed = feedparser.parse(io.BytesIO(body), response_headers=headers)
    problem = parsed.get("bozo_exception")
    # feedparser also flags harmless things (declared vs detected charset, content type); those pass.
    if parsed.get("bozo") and not isinstance(problem, feedparser.ThingsNobodyCaresAboutButMe):
        raise RecordError("feed", f"malformed XML: {problem}")
    if not parsed.get("version") and not parsed.entries:
        raise RecordError("feed", "not an RSS or Atom feed (no feed elements found)")
    return parsed


def _raw(entry: Any, key: str) -> Any:
    # dict.get bypasses FeedParserDict's deprecated updated -> published fallback (and its warning).
    return dict.get(entry, key)


def entry_key(entry: Any) -> str:
    """A stable key for an entry: its guid/id, else link plus updated time, else a content hash."""
    key = entry.get("id") or ""
    if not key and entry.get("link"):
        key = f"{entry.get('link')}|{_raw(entry, 'updated') or _raw(entry, 'published') or ''}"
    if not key:
        key = "sha256:" + hashlib.sha256(f"{entry.get('title')}|{entry.get('summary')}".encode()).hexdigest()
    return key if len(key) <= 300 else "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _entry_time(entry: Any) -> datetime | None:
    moment = _raw(entry, "updated_parsed") or _raw(entry, "published_parsed")
    return datetime.fromtimestamp(calendar.timegm(moment), UTC) if moment else None


def _entry_text(entry: Any) -> str:
    content = entry.get("content") or []
    if content and content[0].get("value", "").strip():
        return str(content[0]["value"])
    return str(entry.get("summary") or "")


def _title_record(mapping: FeedMapping, title: str, limits: IngestLimits) -> dict[str, Any]:
    assert mapping.pattern is not None and mapping.prompt_template is not None  # checked by FeedMapping
    if len(title) > limits.max_prompt_chars:
        raise RecordError("title", f"is {len(title)} characters; the limit is {limits.max_prompt_chars}")
    match = re.fullmatch(mapping.pattern, title.strip())
    if match is None:
        raise RecordError("title", f"does not match the feed's pattern {mapping.pattern!r}")
    groups = {k: v for k, v in match.groupdict().items() if v is not None}
    try:
        prompt = mapping.prompt_template.format_map(groups)
    except KeyError as exc:
        raise RecordError("title", f"group {exc} of prompt_template did not match") from None
    record = {"prompt": prompt, "target_new": groups.get("target_new", "")}
    for optional in ("subject", "ground_truth"):
        if optional in groups:
            record[optional] = groups[optional]
    return record


def entry_outcome(entry: Any, mapping: FeedMapping, *, origin: Origin, limits: IngestLimits) -> Outcome:
    """The fact one entry maps to, or a rejection naming what was wrong with it."""
    text = _entry_text(entry) if mapping.mode == "json" else str(entry.get("title") or "")
    try:
        if mapping.mode == "json":
            try:
                value = parse_line(text.strip().encode("utf-8", "surrogatepass"), limits)
            except RecordError as exc:
                raise RecordError("content", exc.problem) from None
        else:
            value = _title_record(mapping, text, limits)
        return Accepted(to_fact(value, limits, observed_default=_entry_time(entry)), origin)
    except RecordError as exc:
        return RejectionIn(origin=origin, excerpt=safe_excerpt(text), reason=safe_reason(str(exc)))


def poll(source: FeedSource, config: IngestConfig, session_factory: sessionmaker[Session]) -> Poll:
    """Fetch the feed and record its new entries. Raises FetchError when it cannot be fetched."""
    state = open_source(session_factory, name=ledger_name(KIND, source.name), kind=KIND, location=source.url)
    response = conditional_fetch(source.url, config, state)
    if response.not_modified:
        return unchanged_poll(session_factory, state)
    try:
        parsed = parse_feed(response.body, response)
    except RecordError as exc:
        return _record_bad_feed(session_factory, state, source, response.body, str(exc))
    return _record_entries(session_factory, state, source, config, parsed.entries, response)


def _record_bad_feed(
    factory: sessionmaker[Session], state: SourceState, source: FeedSource, body: bytes, reason: str
) -> Poll:
    digest = hashlib.sha256(body).hexdigest()
    cursor = dict(state.cursor)
    outcomes: list[Outcome] = []
    if cursor.get("bad") != digest:  # record each distinct bad body once, not on every poll
        outcomes.append(document_rejection(source=state.name, location=source.url, excerpt=safe_excerpt(body),
                                           reason=reason))
        cursor["bad"] = digest
    return commit_poll(factory, state, outcomes, cursor=cursor, validators=(None, None), failure=reason)


def _record_entries(
    factory: sessionmaker[Session],
    state: SourceState,
    source: FeedSource,
    config: IngestConfig,
    entries: list[Any],
    response: Response,
) -> Poll:
    seen = list(state.cursor.get("seen", []))
    known = set(seen)
    # Oldest first by entry time; entries without one keep feed order reversed (feeds list newest first).
    ordered = sorted(reversed(entries), key=lambda e: _entry_time(e) or _NO_TIME)
    fresh = [(entry_key(e), e) for e in ordered]
    fresh = [(key, e) for key, e in fresh if key not in known]
    todo = fresh[: config.limits.max_facts_per_poll]
    outcomes = [
        entry_outcome(e, source.mapping, origin=Origin(state.name, source.url, f"entry {key}"), limits=config.limits)
        for key, e in todo
    ]
    keep = max(KEEP_SEEN, 2 * len(entries))
    cursor = {"seen": remember(seen, [key for key, _ in todo], keep)}
    finished = len(todo) == len(fresh)
    validators = (response.etag, response.last_modified) if finished else (None, None)
    return commit_poll(factory, state, outcomes, cursor=cursor, validators=validators, rules=polled_rules(config, state.name, source, fetched=True))
