"""Validation: a parsed JSON record becomes a `store.records.FactIn` or a precise `RecordError`.

Types are checked by pydantic in strict mode (no silent coercion of numbers to text); content
rules follow in plain code: text is NFC-normalised and stripped, must not be empty, must not hold
control characters, and must fit the configured lengths; `target_new` must differ from
`ground_truth`; `observed_at` is ISO 8601 with a timezone and is stored in UTC.

`to_outcomes` runs the whole chain for the records of one document and returns, in input order,
an `Accepted` (fact plus origin) or a `RejectionIn` for every record.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ingest.config import IngestLimits
from ingest.documents import RawRecord
from ingest.errors import RecordError
from ingest.shapes import Canonical, canonical
from store.records import FactIn, Locality, Origin, RejectionIn

MAX_ID_CHARS = 200
MAX_REASON_CHARS = 1000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON escapes can produce them; no database stores them
_FORBIDDEN = re.compile(f"{_CONTROL.pattern}|{_SURROGATE.pattern}")


class _LocalityModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    answer: str


class _FactModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrase_prompts: list[str] = []
    locality: list[_LocalityModel] = []
    id: Any = None  # a string or an integer; checked in _build for a clearer message than a union's
    observed_at: str | None = None


@dataclass(frozen=True)
class Accepted:
    """A record that became a fact, with where it came from."""

    fact: FactIn
    origin: Origin


Outcome = Accepted | RejectionIn


def clean_text(field: str, value: str, max_chars: int) -> str:
    """NFC-normalised, stripped text; RecordError if empty, too long or holding control characters."""
    text = unicodedata.normalize("NFC", value).strip()
    if not text:
        raise RecordError(field, "must not be empty or whitespace")
    bad = _FORBIDDEN.search(text)
    if bad:
        what = "an unpaired surrogate" if _SURROGATE.match(bad.group()) else "control character"
        raise RecordError(field, f"contains {what} U+{ord(bad.group()):04X} at position {bad.start() + 1}")
    if len(text) > max_chars:
        raise RecordError(field, f"is {len(text)} characters; the limit is {max_chars}")
    return text


def parse_timestamp(field: str, value: str) -> datetime:
    """An ISO 8601 timestamp with a timezone, converted to UTC."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise RecordError(field, f"{value[:60]!r} is not an ISO 8601 timestamp like 2026-11-21T10:00:00Z") from None
    if moment.tzinfo is None:
        raise RecordError(field, f"{value[:60]!r} has no timezone; add 'Z' or an offset such as +01:00")
    return moment.astimezone(UTC)


def _same_answer(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def _first_error(exc: ValidationError, record: Canonical) -> RecordError:
    err = exc.errors()[0]
    path = ".".join(str(part) for part in err["loc"])
    name = record.original_name(path)
    message = {"missing": "required", "extra_forbidden": "unknown field"}.get(err["type"], err["msg"])
    more = len(exc.errors()) - 1
    return RecordError(name, message + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""))


def _build(model: _FactModel, limits: IngestLimits, observed_default: datetime | None) -> FactIn:
    text = clean_text  # errors carry canonical paths; to_fact renames them to the record's own
    prompt = text("prompt", model.prompt, limits.max_prompt_chars)
    target = text("target_new", model.target_new, limits.max_target_chars)
    subject = None if model.subject is None else text("subject", model.subject, limits.max_prompt_chars)
    truth = None if model.ground_truth is None else text("ground_truth", model.ground_truth, limits.max_target_chars)
    if truth is not None and _same_answer(target, truth):
        raise RecordError("target_new", f"equals ground_truth {truth!r}; nothing to edit")
    for name, items in (("rephrase_prompts", model.rephrase_prompts), ("locality", model.locality)):
        if len(items) > limits.max_list_items:
            raise RecordError(
                name,
                f"has {len(items)} items; the limit is {limits.max_list_items} (ingest.limits.max_list_items)",
            )
    rephrases = tuple(
        text(f"rephrase_prompts.{i}", p, limits.max_prompt_chars) for i, p in enumerate(model.rephrase_prompts)
    )
    locality = tuple(
        Locality(
            text(f"locality.{i}.prompt", pair.prompt, limits.max_prompt_chars),
            text(f"locality.{i}.answer", pair.answer, limits.max_target_chars),
        )
        for i, pair in enumerate(model.locality)
    )
    if model.id is not None and (isinstance(model.id, bool) or not isinstance(model.id, str | int)):
        raise RecordError("id", "must be a string or an integer")
    external_id = None if model.id is None else text("id", str(model.id), MAX_ID_CHARS)
    observed = observed_default
    if model.observed_at is not None:
        observed = parse_timestamp("observed_at", model.observed_at)
    return FactIn(
        prompt=prompt, target_new=target, subject=subject, ground_truth=truth, rephrase_prompts=rephrases,
        locality=locality, external_id=external_id, observed_at=observed,
    )


def to_fact(value: Any, limits: IngestLimits, *, observed_default: datetime | None = None) -> FactIn:
    """Validate one parsed JSON record (any accepted shape) into a FactIn; RecordError says why not."""
    record = canonical(value)
    try:
        model = _FactModel.model_validate(record.fields)
    except ValidationError as exc:
        raise _first_error(exc, record) from None
    try:
        return _build(model, limits, observed_default)
    except RecordError as exc:
        raise RecordError(record.original_name(exc.field), exc.problem) from None


def safe_reason(reason: str) -> str:
    """`reason` made storable: it may quote input (a field name, a value), so escape what cannot be stored."""
    text = reason.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def outcome_of(
    raw: RawRecord, *, source: str, location: str, limits: IngestLimits, observed_default: datetime | None = None
) -> Outcome:
    """An Accepted fact or a RejectionIn with the exact reason, for one raw record."""
    origin = Origin(source=source, location=location, position=raw.position)
    try:
        if raw.error is not None:
            raise raw.error
        return Accepted(to_fact(raw.value, limits, observed_default=observed_default), origin)
    except RecordError as exc:
        return RejectionIn(origin=origin, excerpt=raw.excerpt(), reason=safe_reason(str(exc)))


def to_outcomes(
    records: Iterable[RawRecord],
    *,
    source: str,
    location: str,
    limits: IngestLimits,
    observed_default: datetime | None = None,
) -> list[Outcome]:
    """One outcome per raw record, in order (see `outcome_of`)."""
    return [
        outcome_of(raw, source=source, location=location, limits=limits, observed_default=observed_default)
        for raw in records
    ]


def document_rejection(*, source: str, location: str, excerpt: str, reason: str) -> RejectionIn:
    """The rejection recorded when a whole document (file, body, feed) is unusable."""
    return RejectionIn(origin=Origin(source=source, location=location, position=None), excerpt=excerpt, reason=reason)
