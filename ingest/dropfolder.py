"""The drop folder: complete `*.jsonl`, `*.json` and `*.jsonl.gz` files are read once into the ledger.

Completeness rule (docs/ingest.md): dotfiles and names ending in `.tmp`, `.part` or `~` are
ignored; any other file is read once two consecutive scans saw the same size and mtime and the
mtime is at least `settle_seconds` old. Writing to a temporary name and renaming is recommended.

Exactly once: a file's records are committed in chunks of `commit_every`; each chunk's
transaction also stores the file's digest and how many records are done in the source cursor.
The file moves to `processed/` (or `rejected/` when no record in it was usable, with a report
beside it) only after its last chunk is committed. A process killed at any point resumes from the
cursor: a file already finished is only moved, a half-done one continues at the next record.

Safety: entries are never followed through symbolic links (O_NOFOLLOW); links, directories,
devices and FIFOs matching the patterns are recorded as rejections and moved aside unread;
`processed/` and `rejected/` must be real directories inside the folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ingest.config import IngestConfig
from ingest.documents import iter_document, no_records_reason, safe_excerpt
from ingest.errors import DocumentError, UnsafePath
from ingest.facts import Outcome, document_rejection, outcome_of
from ingest.progress import dump_cursor, load_cursor
from ingest.recording import Tally, record_outcomes
from ingest.trust import trust_rules
from store import intake
from store.records import RejectionIn

logger = logging.getLogger(__name__)

SOURCE_NAME = "inbox"
SUFFIXES = (".jsonl", ".json", ".jsonl.gz")
IGNORED_SUFFIXES = (".tmp", ".part", "~")
PROCESSED, REJECTED = "processed", "rejected"
KEEP_FINISHED = 1000
StepHook = Callable[[str], None]


@dataclass(frozen=True)
class FileResult:
    """What happened to one drop-folder file."""

    name: str
    destination: Path  #: where the file now is (in processed/ or rejected/)
    tally: Tally
    report: Path | None  #: the error report beside it, when any record was rejected


def is_candidate_name(name: str) -> bool:
    """False for names the drop folder ignores (dotfiles, temporary names)."""
    return not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


def _no_step(step: str) -> None:
    del step


class DropFolder:
    """One drop folder and what its scans have seen. Not thread-safe: one scan at a time."""

    def __init__(
        self,
        folder: Path,
        config: IngestConfig,
        session_factory: sessionmaker[Session],
        *,
        source_name: str = SOURCE_NAME,
        on_step: StepHook | None = None,
    ) -> None:
        self.folder = folder
        self.config = config
        self.session_factory = session_factory
        self.source_name = source_name
        self.on_step = on_step or _no_step  # tests use it to kill the process at named steps
        self._seen: dict[str, tuple[int, int]] = {}

    def prepare(self) -> None:
        """Create the folder and its `processed/` and `rejected/` sub-folders; register the source."""
        for sub in (self.folder, self.folder / PROCESSED, self.folder / REJECTED):
            sub.mkdir(parents=True, exist_ok=True)
            if sub.is_symlink() or not sub.is_dir():
                raise UnsafePath(f"{sub} must be a real directory, not a symbolic link or a file")
        with self.session_factory.begin() as session:
            intake.ensure_source(session=session, name=self.source_name, kind="dropfolder", location=str(self.folder))

    def scan(self) -> list[FileResult]:
        """One poll: process every complete file now in the folder, oldest first."""
        self.prepare()
        results = []
        for name in self.complete_files():
            try:
                results.append(self.process(name))
            except FileNotFoundError:
                # Removed or renamed by someone else meanwhile; what was committed before stays recorded.
                logger.warning("drop folder: %s disappeared while being processed; skipped", name)
        return results

    def complete_files(self) -> list[str]:
        """Names of the entries that are ready (see the module docstring), by mtime then name."""
        now = time.time()
        ready: list[tuple[int, str]] = []
        seen: dict[str, tuple[int, int]] = {}
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not is_candidate_name(entry.name) or entry.name in (PROCESSED, REJECTED):
                    continue
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    continue  # sub-folders are not scanned
                signature = (st.st_size, st.st_mtime_ns)
                seen[entry.name] = signature
                settled = now - st.st_mtime >= self.config.settle_seconds
                stable = self.config.settle_seconds == 0 or self._seen.get(entry.name) == signature
                if settled and stable:
                    ready.append((st.st_mtime_ns, entry.name))
        self._seen = seen
        return [name for _, name in sorted(ready)]

    def process(self, name: str) -> FileResult:
        """Read, record and move one file of the folder (named without any directory part)."""
        if os.sep in name or name in ("", ".", ".."):
            raise UnsafePath(f"{name!r} is not a plain file name inside the drop folder")
        path = self.folder / name
        before = _signature(path)
        data, problem = self._read(path)
        digest = _identity(path, data)
        self.on_step("read")
        records, tally = self._record(digest, self._outcomes(name, path, data, problem))
        if _signature(path) != before:
            # Still being written despite the completeness rule: keep it, so the new content is read too.
            logger.warning("drop folder: %s changed while it was read; it stays and is read again "
                           "(write under a temporary name and rename when done)", name)
            return FileResult(name, path, tally, None)
        usable = tally.accepted + tally.duplicates > 0
        destination = self._destination(REJECTED if not usable else PROCESSED, name)
        report = self._write_report(name, destination, digest, records, tally) if tally.rejections else None
        self.on_step("reported")
        os.rename(path, destination)
        self.on_step("moved")
        logger.info(
            "drop folder: %s ◆ %d accepted ◆ %d duplicates ◆ %d rejected → %s",
            name, tally.accepted, tally.duplicates, tally.rejected, destination.parent.name,
        )
        return FileResult(name, destination, tally, report)

    def _read(self, path: Path) -> tuple[bytes, str | None]:
        """The file's bytes, or a reason it is not read (not a regular file, too large)."""
        limit = self.config.limits.max_file_bytes
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            kind = "a symbolic link" if path.is_symlink() else f"unreadable ({exc.strerror})"
            return b"", f"file: is {kind}; the drop folder only reads regular files"
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                return b"", "file: is not a regular file (device, FIFO or socket); it was not read"
            if st.st_size > limit:
                return b"", f"file: is {st.st_size} bytes; the limit is {limit} (ingest.limits.max_file_bytes)"
            data = handle.read(limit + 1)
        if len(data) > limit:
            return b"", f"file: grew beyond {limit} bytes while being read (ingest.limits.max_file_bytes)"
        return data, None

    def _outcomes(self, name: str, path: Path, data: bytes, problem: str | None) -> Iterator[Outcome]:
        """The file's outcomes, produced lazily so that the first chunk is stored before the whole is parsed."""
        location = str(path)
        if problem is None and not name.endswith(SUFFIXES):
            problem = f"file: unsupported file type; use {', '.join(SUFFIXES)}"
        if problem is None:
            produced = False
            try:
                for raw in iter_document(data, name=name, limits=self.config.limits):
                    produced = True
                    yield outcome_of(raw, source=self.source_name, location=location, limits=self.config.limits)
            except DocumentError as exc:
                problem = f"file: {exc}"
            else:
                if produced:
                    return
                problem = no_records_reason(name, data)
        yield document_rejection(source=self.source_name, location=location, excerpt=safe_excerpt(data), reason=problem)

    def _record(self, digest: str, outcomes: Iterator[Outcome]) -> tuple[int, Tally]:
        """Commit `outcomes` in chunks, skipping those the cursor says are already committed.

        Returns the number of records in the file and the whole file's tally (rejections collected for
        the report). A rejection of the whole file (empty, not JSON, too large) is no record.
        """
        with self.session_factory() as session:
            cursor = load_cursor(session, self.source_name)
        finished = cursor.get("finished", {})
        current = cursor.get("file") or {}
        counts: dict[str, Any] = current if current.get("digest") == digest else {"digest": digest, "done": 0}
        already, seen = (None, 0) if digest in finished else (int(counts["done"]), 0)
        rejections: list[RejectionIn] = []
        rules = trust_rules(self.config)
        for chunk, last in _chunks(outcomes, self.config.commit_every):
            rejections.extend(o for o in chunk if isinstance(o, RejectionIn))
            todo = [] if already is None else chunk[max(0, already - seen) :]
            seen += len(chunk)
            if not todo:
                continue
            with self.session_factory.begin() as session:
                counts = _advance(counts, record_outcomes(session, todo, rules), len(todo))
                self._save_cursor(session, counts, done=last)
            self.on_step("committed")
        if already is None:
            counts = finished[digest]
        whole_file = sum(1 for r in rejections if r.origin.position is None)
        return seen - whole_file, _tally_from(counts, rejections)

    def _save_cursor(self, session: Session, counts: dict[str, Any], *, done: bool) -> None:
        cursor = load_cursor(session, self.source_name)
        if done:
            finished = cursor.get("finished", {})
            finished[counts["digest"]] = counts
            cursor["finished"] = {k: finished[k] for k in list(finished)[-KEEP_FINISHED:]}
            cursor.pop("file", None)
        else:
            cursor["file"] = counts
        intake.update_source_poll_state(session=session, name=self.source_name, cursor=dump_cursor(cursor), ok=True)

    def _destination(self, sub: str, name: str) -> Path:
        folder = self.folder / sub
        if folder.is_symlink() or not folder.is_dir():
            raise UnsafePath(f"{folder} must be a real directory, not a symbolic link or a file")
        stem, dot, rest = name.partition(".")
        candidate, number = folder / name, 1
        while candidate.exists() or candidate.is_symlink():
            number += 1
            candidate = folder / f"{stem}-{number}{dot}{rest}"
        return candidate

    def _write_report(self, name: str, destination: Path, digest: str, records: int, tally: Tally) -> Path:
        report = destination.with_name(destination.name + ".report.json")
        body = {
            "file": name,
            "source": self.source_name,
            "sha256": digest.split(":", 1)[0],
            "records": records,
            "accepted": tally.accepted,
            "duplicates": tally.duplicates,
            "rejected": tally.rejected,
            "errors": [
                {
                    "position": r.origin.position,
                    "field": r.reason.split(":", 1)[0],
                    "reason": r.reason,
                    "excerpt": r.excerpt,
                }
                for r in tally.rejections
            ],
        }
        temporary = report.with_name("." + report.name + ".tmp")
        temporary.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(temporary, report)
        return report


def _signature(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _identity(path: Path, data: bytes) -> str:
    """Identifies this instance of the file: its content, name, inode and mtime.

    The same file found again after a crash has the same identity; the same content dropped again
    later (a new inode and mtime) is a new arrival and is recorded again.
    """
    st = os.lstat(path)
    content = hashlib.sha256(data).hexdigest()
    return f"{content}:{path.name}:{st.st_ino}:{st.st_mtime_ns}"


def _chunks(items: Iterator[Outcome], size: int) -> Iterator[tuple[list[Outcome], bool]]:
    """Lists of `size` items (the last may be shorter), each with whether it is the last one."""
    chunk = list(itertools.islice(items, size))
    while chunk:
        following = list(itertools.islice(items, size))
        yield chunk, not following
        chunk = following


def _tally_from(counts: dict[str, Any], rejections: list[RejectionIn]) -> Tally:
    return Tally(
        accepted=int(counts.get("accepted", 0)),
        duplicates=int(counts.get("duplicates", 0)),
        superseded=int(counts.get("superseded", 0)),
        rejections=rejections,
    )


def _advance(counts: dict[str, Any], part: Tally, size: int) -> dict[str, Any]:
    return {
        "digest": counts["digest"],
        "done": counts["done"] + size,
        "accepted": counts.get("accepted", 0) + part.accepted,
        "duplicates": counts.get("duplicates", 0) + part.duplicates,
        "superseded": counts.get("superseded", 0) + part.superseded,
    }
