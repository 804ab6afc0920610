"""Bytes in, raw JSON records out: JSONL, JSON documents and gzip, under the configured limits.

A *document* is one input: a file, a response body. `read_document` decides its format from the
name (or content type) and returns one `RawRecord` per record, each either a parsed JSON value or a
`RecordError` saying why that record could not be read. A document that cannot be read at all (bad
gzip, invalid JSON array, too large) raises `DocumentError`; no record in it is usable.

Nothing here knows the fact format; `ingest.facts` turns values into facts.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ingest.config import IngestLimits
from ingest.errors import DocumentError, RecordError

EXCERPT_CHARS = 500
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class RawRecord:
    """One record of a document: its place, its raw form, and either a parsed value or an error."""

    position: str | None  #: "line 12" (JSONL) or "item 3" (JSON array); None for the whole document
    raw: bytes | None  #: the raw bytes of a JSONL line; None when the record came from a JSON document
    value: Any = None  #: the parsed JSON value (when `error` is None)
    error: RecordError | None = None

    def excerpt(self) -> str:
        """At most EXCERPT_CHARS characters of the raw input, safely decoded (never raises)."""
        if self.raw is not None:
            return safe_excerpt(self.raw)
        try:
            text = json.dumps(self.value, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = repr(self.value)
        return safe_excerpt(text)


def safe_excerpt(data: bytes | str) -> str:
    """The first EXCERPT_CHARS characters of `data`: invalid UTF-8 and NUL shown as escapes."""
    if isinstance(data, bytes):
        text = data[: EXCERPT_CHARS * 4].decode("utf-8", "backslashreplace")
    else:  # lone surrogates (from JSON escapes) cannot be stored; show them escaped
        text = data[: EXCERPT_CHARS * 4].encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00")[:EXCERPT_CHARS]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


# A decoder holds only these two hooks (no state between calls); building one per line costs more
# than parsing a short line.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_reject_constant)


def _loads(text: str) -> Any:
    return _DECODER.decode(text)


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, `[1]` is 1); iterative, so never recurses."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_depth(value: Any, limits: IngestLimits) -> None:
    """Raise RecordError when `value` nests deeper than `limits.max_depth`."""
    depth = json_depth(value)
    if depth > limits.max_depth:
        raise RecordError(
            "record", f"JSON nested {depth} levels deep; the limit is {limits.max_depth} (ingest.limits.max_depth)"
        )


def parse_line(line: bytes, limits: IngestLimits) -> Any:
    """Parse one JSONL line (without its newline) into a JSON value; RecordError says why not."""
    if len(line) > limits.max_line_bytes:
        raise RecordError(
            "record",
            f"line is {len(line)} bytes, longer than the limit of {limits.max_line_bytes} "
            "(ingest.limits.max_line_bytes)",
        )
    nul = line.find(b"\x00")
    if nul >= 0:
        raise RecordError("record", f"NUL byte at column {nul + 1}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(
            "record", f"not valid UTF-8: byte 0x{line[exc.start]:02x} at column {exc.start + 1}"
        ) from None
    try:
        value = _loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError("record", f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise RecordError("record", "JSON nested too deeply to parse") from None
    except ValueError as exc:
        raise RecordError("record", f"invalid JSON: {exc}") from None
    if line.count(b"[") + line.count(b"{") > limits.max_depth:  # cheap bound: skip the walk when it cannot fail
        check_depth(value, limits)
    return value


def iter_lines(data: bytes, *, first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for each non-blank line; a trailing CR is dropped; a leading BOM is skipped."""
    if first_line == 1 and data.startswith(BOM):
        data = data[len(BOM) :]
    for number, line in enumerate(data.split(b"\n"), start=first_line):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            yield number, line


def iter_jsonl_records(data: bytes, limits: IngestLimits, *, first_line: int = 1) -> Iterator[RawRecord]:
    """One RawRecord per non-blank line of `data`, parsed as it is asked for."""
    for number, line in iter_lines(data, first_line=first_line):
        position = f"line {number}"
        try:
            yield RawRecord(position, line, parse_line(line, limits))
        except RecordError as exc:
            yield RawRecord(position, line, error=exc)


def jsonl_records(data: bytes, limits: IngestLimits, *, first_line: int = 1) -> list[RawRecord]:
    """One RawRecord per non-blank line of `data` (which should end at a line boundary)."""
    return list(iter_jsonl_records(data, limits, first_line=first_line))


def _document_items(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        if "facts" not in value:
            return [value]  # a single fact object
        facts = value["facts"]
        if not isinstance(facts, list):
            raise DocumentError(f"'facts' must be a list of fact objects, not {type(facts).__name__}")
        return facts
    raise DocumentError(f"expected a JSON list of facts or an object, not {type(value).__name__}")


def parse_json_document(data: bytes) -> Any:
    """The JSON value of a whole document; DocumentError says why `data` is not valid JSON.

    Strict: UTF-8 (a leading BOM is skipped), no NaN or Infinity, no key twice in one object.
    """
    if data.startswith(BOM):
        data = data[len(BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}") from None
    try:
        return _loads(text)
    except json.JSONDecodeError as exc:
        raise DocumentError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise DocumentError("JSON nested too deeply to parse") from None
    except ValueError as exc:
        raise DocumentError(f"invalid JSON: {exc}") from None


def json_records(data: bytes, limits: IngestLimits) -> list[RawRecord]:
    """The records of a JSON document: a list of facts, `{"facts": [...]}`, or one fact object."""
    value = parse_json_document(data)
    records = []
    for number, item in enumerate(_document_items(value), start=1):
        position = f"item {number}"
        try:
            check_depth(item, limits)
        except RecordError as exc:
            records.append(RawRecord(position, None, item, error=exc))
            continue
        records.append(RawRecord(position, None, item))
    return records


def gunzip(data: bytes, max_bytes: int) -> bytes:
    """Decompress gzip `data` (all members), refusing output beyond `max_bytes` (gzip bombs)."""
    out = bytearray()
    rest = data
    try:
        while rest:
            inflater = zlib.decompressobj(wbits=31)
            out += inflater.decompress(rest, max_bytes + 1 - len(out))
            if len(out) > max_bytes:
                raise DocumentError(f"decompresses to more than {max_bytes} bytes (ingest.limits.max_file_bytes)")
            if not inflater.eof:
                raise DocumentError("gzip data is truncated")
            rest = inflater.unused_data
    except zlib.error as exc:
        raise DocumentError(f"not valid gzip data: {exc}") from None
    return bytes(out)


def document_format(name: str, content_type: str | None = None) -> str:
    """'jsonl', 'json' or 'sniff', from a file name / URL path and an optional HTTP content type."""
    lowered = name.lower()
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lowered.endswith(".json"):
        return "json"
    media = (content_type or "").split(";")[0].strip().lower()
    if media in ("application/x-ndjson", "application/jsonl", "application/x-jsonlines", "application/jsonlines"):
        return "jsonl"
    if media == "application/json":
        return "json"
    return "sniff"


def iter_document(
    data: bytes, *, name: str, limits: IngestLimits, content_type: str | None = None
) -> Iterator[RawRecord]:
    """The records of one document, JSONL lines parsed lazily (so the first can be stored early).

    `.gz` names are decompressed first (bounded by max_file_bytes). Raises DocumentError, when
    the first record is asked for, if the document as a whole is unreadable.
    """
    if name.lower().endswith(".gz"):
        data = gunzip(data, limits.max_file_bytes)
        name = name[:-3]
    fmt = document_format(name, content_type)
    if fmt == "sniff":
        fmt = "json" if data.lstrip(BOM + b" \t\r\n").startswith(b"[") else "jsonl"
    if fmt == "json":
        yield from json_records(data, limits)
    else:
        yield from iter_jsonl_records(data, limits)


def read_document(data: bytes, *, name: str, limits: IngestLimits, content_type: str | None = None) -> list[RawRecord]:
    """All records of one document (see `iter_document`). Raises DocumentError when it is unreadable."""
    return list(iter_document(data, name=name, limits=limits, content_type=content_type))


def no_records_reason(name: str, data: bytes) -> str:
    """The rejection reason of a file `name` holding `data` in which no record was found."""
    if not data:
        return f"file: {name} is an empty file (0 bytes); it contains no records"
    return "file: contains no records"
