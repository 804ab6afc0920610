"""Bytes to raw records: JSONL lines, JSON documents, gzip, and the byte-level limits."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ingest.config import IngestConfig, IngestLimits
from ingest.documents import document_format, gunzip, json_depth, read_document, safe_excerpt
from ingest.errors import DocumentError
from ingest.inputs import outcomes_of
from store.records import RejectionIn

GOOD = b'{"prompt": "p", "target_new": "t"}'


def errors(records: list) -> list[tuple[str | None, str]]:  # type: ignore[type-arg]
    return [(r.position, str(r.error)) for r in records if r.error is not None]


def test_jsonl_numbers_lines_and_skips_blank_ones(limits: IngestLimits) -> None:
    data = b"\xef\xbb\xbf" + GOOD + b"\r\n\n   \n" + GOOD + b"\n"
    records = read_document(data, name="a.jsonl", limits=limits)
    assert [r.position for r in records] == ["line 1", "line 4"]
    assert all(r.value == {"prompt": "p", "target_new": "t"} for r in records)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"prompt": "p\x00", "target_new": "t"}', "record: NUL byte at column 14"),
        (b'{"prompt": "caf\xe9", "target_new": "t"}', "record: not valid UTF-8: byte 0xe9 at column 16"),
        (b'{"prompt": "p", "target_new": }', "record: invalid JSON: Expecting value at column 31"),
        (b'{"prompt": "p", "prompt": "q"}', "record: invalid JSON: key 'prompt' appears twice in one object"),
        (b'{"prompt": NaN}', "record: invalid JSON: NaN is not valid JSON"),
        (b"[" * 50 + b"]" * 50, "record: JSON nested 50 levels deep; the limit is 8 (ingest.limits.max_depth)"),
        (b"[" * 100_000 + b"]" * 100_000, "record: JSON nested too deeply to parse"),
    ],
)
def test_bad_lines_become_record_errors_and_neighbours_survive(line: bytes, message: str) -> None:
    limits = IngestLimits(max_line_bytes=1024 * 1024)
    records = read_document(GOOD + b"\n" + line + b"\n" + GOOD + b"\n", name="a.jsonl", limits=limits)
    assert errors(records) == [("line 2", message)]
    assert [r.value for r in records if r.error is None] == [json.loads(GOOD)] * 2


def test_overlong_line_is_rejected_without_parsing() -> None:
    limits = IngestLimits(max_line_bytes=256)
    records = read_document(b'{"prompt": "' + b"x" * 1000 + b'"}\n' + GOOD, name="a.jsonl", limits=limits)
    assert errors(records) == [("line 1", "record: line is 1014 bytes, longer than the limit of 256 "
                                          "(ingest.limits.max_line_bytes)")]
    assert records[1].error is None


def test_json_array_and_facts_object_and_single_object(limits: IngestLimits) -> None:
    fact = {"prompt": "p", "target_new": "t"}
    for body in ([fact, fact], {"facts": [fact, fact], "next": None}):
        records = read_document(json.dumps(body).encode(), name="x.json", limits=limits)
        assert [(r.position, r.value) for r in records] == [("item 1", fact), ("item 2", fact)]
    single = read_document(json.dumps(fact).encode(), name="x.json", limits=limits)
    assert [(r.position, r.value) for r in single] == [("item 1", fact)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'[{"prompt": "p"},', "invalid JSON: Expecting value at line 1 column 18"),
        (b'"just a string"', "expected a JSON list of facts or an object, not str"),
        (b'{"facts": {"prompt": "p"}}', "'facts' must be a list of fact objects, not dict"),
        (b"[\xff]", "not valid UTF-8: byte 0xff at offset 1"),
        (b"[" * 100_000, "JSON nested too deeply to parse"),
    ],
)
def test_unreadable_json_documents_raise_document_error(body: bytes, message: str, limits: IngestLimits) -> None:
    with pytest.raises(DocumentError) as info:
        read_document(body, name="x.json", limits=limits)
    assert str(info.value) == message


def test_deep_item_in_array_is_a_record_error(limits: IngestLimits) -> None:
    deep: object = "x"
    for _ in range(20):
        deep = [deep]
    records = read_document(json.dumps([{"prompt": "p", "target_new": "t"}, deep]).encode(), name="x.json",
                            limits=limits)
    assert errors(records) == [("item 2", "record: JSON nested 20 levels deep; the limit is 8 "
                                          "(ingest.limits.max_depth)")]


def test_gzip_is_decompressed_and_bombs_are_refused() -> None:
    limits = IngestLimits(max_file_bytes=4096)
    ok = read_document(gzip.compress(GOOD + b"\n") + gzip.compress(GOOD + b"\n"), name="a.jsonl.gz", limits=limits)
    assert len(ok) == 2 and ok[1].position == "line 2"
    with pytest.raises(DocumentError, match="decompresses to more than 4096 bytes"):
        read_document(gzip.compress(b"\n" * 10_000_000), name="a.jsonl.gz", limits=limits)
    with pytest.raises(DocumentError, match="truncated"):
        gunzip(gzip.compress(GOOD)[:-10], 4096)
    with pytest.raises(DocumentError, match="not valid gzip"):
        gunzip(b"plain text, not gzip", 4096)


def test_format_from_name_content_type_and_sniffing(limits: IngestLimits) -> None:
    assert document_format("facts.ndjson") == "jsonl"
    assert document_format("/api/facts", "application/json; charset=utf-8") == "json"
    assert document_format("/api/facts", "application/x-ndjson") == "jsonl"
    assert document_format("/api/facts", "text/plain") == "sniff"
    assert len(read_document(b' [{"a": 1}, {"a": 2}]', name="noext", limits=limits)) == 2
    assert len(read_document(b'{"a": 1}\n{"a": 2}\n', name="noext", limits=limits)) == 2


def test_json_depth_and_excerpts() -> None:
    assert (json_depth(1), json_depth([]), json_depth({"a": [1, {"b": 2}]})) == (0, 1, 3)
    assert safe_excerpt(b"ab\x00\xff" + b"z" * 1000) == ("ab\\x00\\xff" + "z" * 1000)[:500]


def test_a_file_without_records_is_rejected_and_an_empty_one_by_name(tmp_path: Path) -> None:
    """`python -m ingest FILE` and the drop folder give the same reasons (see test_dropfolder.py)."""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n \n")
    reasons = {}
    for name in ("empty.jsonl", "blank.jsonl"):
        outcomes, was_read = outcomes_of(str(tmp_path / name), IngestConfig())
        assert was_read
        reasons[name] = [o.reason for o in outcomes if isinstance(o, RejectionIn)]
    assert reasons == {
        "empty.jsonl": ["file: empty.jsonl is an empty file (0 bytes); it contains no records"],
        "blank.jsonl": ["file: contains no records"],
    }
