"""The drop folder: completeness rule, moves after commit, reports, symlinks and other unsafe entries."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from ingest.config import IngestConfig
from ingest.dropfolder import DropFolder, is_candidate_name
from ingest.errors import UnsafePath
from tests.ingest.conftest import counts, rejection_reasons


def fact(i: int) -> str:
    return json.dumps({"prompt": f"Prompt number {i} is", "target_new": f"target {i}"})


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def test_good_and_bad_lines_processed_file_moves_with_report(
    inbox: Path, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    (inbox / "a.jsonl").write_text(f"{fact(1)}\n{{\"prompt\": \"x\", \"target_new\": \"\"}}\n{fact(2)}\n")
    [result] = DropFolder(inbox, ingest_config, ledger).scan()
    assert result.destination == inbox / "processed" / "a.jsonl" and result.destination.exists()
    assert not (inbox / "a.jsonl").exists()
    assert (result.tally.accepted, result.tally.rejected) == (2, 1)
    assert counts(ledger) == (2, 2, 1)
    assert rejection_reasons(ledger) == [("line 2", "target_new: must not be empty or whitespace")]
    assert result.report is not None
    report = json.loads(result.report.read_text())
    assert report["errors"] == [{"position": "line 2", "field": "target_new",
                                 "reason": "target_new: must not be empty or whitespace",
                                 "excerpt": '{"prompt": "x", "target_new": ""}'}]
    assert (report["accepted"], report["rejected"], report["records"]) == (2, 1, 3)


def test_file_with_nothing_usable_goes_to_rejected(
    inbox: Path, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    (inbox / "bad.json").write_text("[1, 2")
    (inbox / "empty.jsonl").write_text("\n\n")
    results = {r.name: r for r in DropFolder(inbox, ingest_config, ledger).scan()}
    assert results["bad.json"].destination == inbox / "rejected" / "bad.json"
    assert results["empty.jsonl"].destination == inbox / "rejected" / "empty.jsonl"
    assert (inbox / "rejected" / "bad.json.report.json").exists()
    assert sorted(reason for _, reason in rejection_reasons(ledger)) == [
        "file: contains no records", "file: invalid JSON: Expecting ',' delimiter at line 1 column 6"]


def test_an_empty_file_has_no_records_and_is_rejected_by_name(
    inbox: Path, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    (inbox / "empty.jsonl").write_bytes(b"")
    (inbox / "broken.json").write_text("[1, 2")
    results = {r.name: r for r in DropFolder(inbox, ingest_config, ledger).scan()}

    empty = results["empty.jsonl"]
    assert empty.destination == inbox / "rejected" / "empty.jsonl"
    assert empty.report is not None
    report = json.loads(empty.report.read_text())
    assert (report["records"], report["accepted"], report["rejected"]) == (0, 0, 1)
    assert report["errors"] == [{"position": None, "field": "file", "excerpt": "",
                                 "reason": "file: empty.jsonl is an empty file (0 bytes); it contains no records"}]
    broken = results["broken.json"].report
    assert broken is not None and json.loads(broken.read_text())["records"] == 0  # unreadable as a whole: no record


def test_gzip_and_json_array_files(inbox: Path, ingest_config: IngestConfig, ledger: sessionmaker[Session]) -> None:
    (inbox / "a.jsonl.gz").write_bytes(gzip.compress(f"{fact(1)}\n{fact(2)}\n".encode()))
    (inbox / "b.json").write_text(json.dumps({"facts": [json.loads(fact(3)), json.loads(fact(1))]}))
    results = DropFolder(inbox, ingest_config, ledger).scan()
    assert sorted((r.name, r.tally.accepted, r.tally.duplicates) for r in results) == [
        ("a.jsonl.gz", 2, 0), ("b.json", 1, 1)]
    assert counts(ledger) == (3, 4, 0)


def test_completeness_rule(inbox: Path, ledger: sessionmaker[Session]) -> None:
    config = IngestConfig(settle_seconds=0.2)
    folder = DropFolder(inbox, config, ledger)
    for ignored in (".hidden.jsonl", "writing.jsonl.tmp", "part.json.part", "backup.jsonl~"):
        (inbox / ignored).write_text(fact(0) + "\n")
    (inbox / "late.jsonl").write_text(fact(1) + "\n")
    assert folder.scan() == []  # first sighting: not yet stable, and too recent
    time.sleep(0.3)
    (inbox / "late.jsonl").write_text(fact(1) + "\n" + fact(2) + "\n")  # still growing
    assert folder.scan() == []
    time.sleep(0.3)
    [result] = folder.scan()
    assert result.name == "late.jsonl" and result.tally.accepted == 2
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == [
        ".hidden.jsonl", "backup.jsonl~", "part.json.part", "writing.jsonl.tmp"]
    assert [is_candidate_name(n) for n in (".x.json", "x.tmp", "x.json")] == [False, False, True]


def test_symlinks_are_not_followed(inbox: Path, tmp_path: Path, ingest_config: IngestConfig,
                                   ledger: sessionmaker[Session]) -> None:
    outside = tmp_path / "secret.jsonl"
    outside.write_text(fact(99) + "\n")
    (inbox / "link.jsonl").symlink_to(outside)
    (inbox / "dirlink.jsonl").symlink_to(tmp_path)
    (inbox / "good.jsonl").write_text(fact(1) + "\n")
    results = {r.name: r for r in DropFolder(inbox, ingest_config, ledger).scan()}
    assert results["link.jsonl"].destination == inbox / "rejected" / "link.jsonl"
    assert (inbox / "rejected" / "link.jsonl").is_symlink() and outside.exists()
    assert counts(ledger) == (1, 1, 2)  # only good.jsonl's fact; the secret was never read
    assert {reason for _, reason in rejection_reasons(ledger)} == {
        "file: is a symbolic link; the drop folder only reads regular files"}


def test_fifo_is_rejected_without_blocking(inbox: Path, ingest_config: IngestConfig,
                                           ledger: sessionmaker[Session]) -> None:
    os.mkfifo(inbox / "pipe.jsonl")
    [result] = DropFolder(inbox, ingest_config, ledger).scan()
    assert result.destination.parent.name == "rejected"
    assert rejection_reasons(ledger) == [
        (None, "file: is not a regular file (device, FIFO or socket); it was not read")]


def test_unsupported_type_and_oversized_file(inbox: Path, ledger: sessionmaker[Session]) -> None:
    config = IngestConfig(settle_seconds=0, limits={"max_file_bytes": 2048})  # type: ignore[arg-type]
    (inbox / "facts.csv").write_text("prompt,target\n")
    (inbox / "huge.jsonl").write_text((fact(1) + "\n") * 100)
    DropFolder(inbox, config, ledger).scan()
    assert sorted(reason for _, reason in rejection_reasons(ledger)) == [
        "file: is 5900 bytes; the limit is 2048 (ingest.limits.max_file_bytes)",
        "file: unsupported file type; use .jsonl, .json, .jsonl.gz",
    ]
    assert sorted(p.name for p in (inbox / "rejected").iterdir()) == [
        "facts.csv", "facts.csv.report.json", "huge.jsonl", "huge.jsonl.report.json"]


def test_name_clash_in_processed_gets_a_new_name(inbox: Path, ingest_config: IngestConfig,
                                                 ledger: sessionmaker[Session]) -> None:
    folder = DropFolder(inbox, ingest_config, ledger)
    (inbox / "a.jsonl").write_text(fact(1) + "\n")
    folder.scan()
    (inbox / "a.jsonl").write_text(fact(2) + "\n")
    [second] = folder.scan()
    assert second.destination == inbox / "processed" / "a-2.jsonl"
    assert (inbox / "processed" / "a.jsonl").read_text() == fact(1) + "\n"


def test_same_content_dropped_again_is_a_new_arrival(inbox: Path, ingest_config: IngestConfig,
                                                     ledger: sessionmaker[Session]) -> None:
    folder = DropFolder(inbox, ingest_config, ledger)
    for _ in range(2):
        (inbox / "a.jsonl").write_text(fact(1) + "\n")
        folder.scan()
    assert counts(ledger) == (1, 2, 0)  # one fact, two recorded arrivals


def test_processed_folder_must_not_be_a_symlink(inbox: Path, tmp_path: Path, ingest_config: IngestConfig,
                                                ledger: sessionmaker[Session]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (inbox / "processed").symlink_to(elsewhere)
    (inbox / "a.jsonl").write_text(fact(1) + "\n")
    with pytest.raises(UnsafePath, match="must be a real directory"):
        DropFolder(inbox, ingest_config, ledger).scan()
    assert (inbox / "a.jsonl").exists() and not any(elsewhere.iterdir())


def test_process_refuses_names_with_directories(inbox: Path, ingest_config: IngestConfig,
                                                ledger: sessionmaker[Session]) -> None:
    with pytest.raises(UnsafePath):
        DropFolder(inbox, ingest_config, ledger).process("../outside.jsonl")


def test_file_changed_while_read_stays_and_is_read_again(
    inbox: Path, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    path = inbox / "growing.jsonl"
    path.write_text(fact(1) + "\n")

    def writer_still_busy(step: str) -> None:
        if step == "read" and path.read_text().count("\n") == 1:
            with path.open("a") as handle:
                handle.write(fact(2) + "\n")

    [first] = DropFolder(inbox, ingest_config, ledger, on_step=writer_still_busy).scan()
    assert first.destination == path and path.exists()  # not moved: its new line was not read yet
    [second] = DropFolder(inbox, ingest_config, ledger).scan()
    assert second.destination == inbox / "processed" / "growing.jsonl"
    assert (second.tally.accepted, second.tally.duplicates) == (1, 1)
    assert counts(ledger) == (2, 3, 0)


def test_file_removed_after_the_scan_saw_it_is_skipped(
    inbox: Path, ingest_config: IngestConfig, ledger: sessionmaker[Session]
) -> None:
    for name, age in (("a.jsonl", 20), ("b.jsonl", 10)):
        (inbox / name).write_text(fact(age) + "\n")
        os.utime(inbox / name, (time.time() - age, time.time() - age))

    def remove_b(step: str) -> None:
        if step == "read" and (inbox / "b.jsonl").exists():
            (inbox / "b.jsonl").unlink()

    results = DropFolder(inbox, ingest_config, ledger, on_step=remove_b).scan()
    assert [(r.name, r.tally.accepted) for r in results] == [("a.jsonl", 1)]
    assert counts(ledger) == (1, 1, 0)
