"""The artefact store: one safetensors file per commit and per snapshot, in `<state_dir>/artefacts`.

Files (see docs/model-state.md for what the tensors mean):

- ``commit-00000042.safetensors``: what commit 42 changed (its encoded weight deltas and the editor
  state after it). Its sha256 is recorded in the ledger's commit row.
- ``snapshot-00000040.safetensors``: the cumulative state at version 40 (fp32 master weights of the
  edited modules and the editor state), so a rebuild need not replay every commit from the base.
  ``snapshot-00000000`` (the genesis) records the base: model fingerprint, edited modules, editor state.
- ``.tmp-*``: a write in progress; a crash leaves one behind and `remove_orphans` deletes it.

Invariants:
- A file with a final name is complete and durable: it is written to a temporary file, fsynced,
  renamed into place and the directory is fsynced (`write`).
- Every file carries, in its safetensors metadata, a digest of its tensors (`tensors_sha256`), so a
  read detects corruption even where no ledger hash is at hand; `read` raises ArtefactCorrupt.
- This module knows nothing of model maths: tensors and string metadata in, the same out.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

#: Written into every file's metadata; a reader refuses other formats or newer schemas.
ARTEFACT_FORMAT = "ked-artefact"
SCHEMA_VERSION = 1
TEMP_PREFIX = ".tmp-"
SUFFIX = ".safetensors"
#: Reserved metadata keys (set by `write`; callers' metadata may not use them).
RESERVED_KEYS = ("format", "schema", "kind", "version", "tensors_sha256")


class ArtefactError(RuntimeError):
    """Base class: an artefact could not be written, found or used."""


class ArtefactMissing(ArtefactError, LookupError):
    """An artefact the ledger refers to is not in the store."""


class ArtefactCorrupt(ArtefactError):
    """An artefact's bytes do not match its recorded hash or its own digest, or it cannot be parsed."""


class ArtefactKind(enum.StrEnum):
    """The two kinds of file in the store."""

    COMMIT = "commit"  #: what one commit changed
    SNAPSHOT = "snapshot"  #: the cumulative state at one version


@dataclass(frozen=True)
class ArtefactInfo:
    """Where an artefact lives and what it weighs; `sha256` is of the whole file (None when not read)."""

    kind: ArtefactKind
    version: int
    path: Path
    size_bytes: int
    sha256: str | None = None


@dataclass(frozen=True)
class Artefact:
    """An artefact read back and verified: its tensors and its metadata (reserved keys included)."""

    info: ArtefactInfo
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


@dataclass(frozen=True)
class StorageUsage:
    """Bytes on disk per kind of file (temporary files excluded)."""

    commit_files: int
    commit_bytes: int
    snapshot_files: int
    snapshot_bytes: int
    largest_snapshot_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.commit_bytes + self.snapshot_bytes

    @property
    def mean_commit_bytes(self) -> float:
        """Mean size of one commit artefact (0 when there is none)."""
        return self.commit_bytes / self.commit_files if self.commit_files else 0.0

    def bytes_per_commit(self, snapshot_every: int) -> float:
        """Disk written per commit: a commit artefact plus a full snapshot's share (one per `snapshot_every`)."""
        share = self.largest_snapshot_bytes / snapshot_every if snapshot_every > 0 else 0.0
        return self.mean_commit_bytes + share


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of file layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable (POSIX: the directory entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, on_temp_written: Callable[[], None] | None = None) -> None:
    """Write `data` to `path` atomically: temporary file, fsync, rename, fsync of the directory.

    A reader (or a crash) sees either the old state or the whole new file, never a part.
    `on_temp_written` is called after the temporary file is durable and before the rename.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if on_temp_written is not None:
            on_temp_written()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def read_header_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a file, reading only its header."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise ArtefactMissing(f"artefact {path} does not exist") from None
    except (struct.error, ValueError, OSError) as exc:
        raise ArtefactCorrupt(f"artefact {path} has no readable safetensors header: {exc}") from None
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


class ArtefactStore:
    """The artefact files of one state directory. Creating the object does no I/O."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, kind: ArtefactKind, version: int) -> Path:
        """The one place that builds an artefact's file name."""
        if version < 0:
            raise ValueError(f"artefact versions are >= 0, got {version}")
        return self.directory / f"{kind.value}-{version:08d}{SUFFIX}"

    def exists(self, kind: ArtefactKind, version: int) -> bool:
        return self.path(kind, version).is_file()

    def write(
        self,
        kind: ArtefactKind,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        *,
        on_temp_written: Callable[[], None] | None = None,
    ) -> ArtefactInfo:
        """Write an artefact durably (see `write_durably`) and return its path, size and sha256.

        Refuses to overwrite an existing artefact: versions are never reused, so an existing file
        means a caller bug or an orphan that recovery should have removed.
        """
        clash = [key for key in RESERVED_KEYS if key in metadata]
        if clash:
            raise ValueError(f"metadata keys {clash} are reserved by the artefact store")
        path = self.path(kind, version)
        if path.exists():
            raise ArtefactError(f"{path} already exists; versions are never reused (run recovery to remove orphans)")
        self.directory.mkdir(parents=True, exist_ok=True)
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        header = {
            **metadata,
            "format": ARTEFACT_FORMAT,
            "schema": str(SCHEMA_VERSION),
            "kind": kind.value,
            "version": str(version),
            "tensors_sha256": tensors_sha256(contiguous),
        }
        data = save_safetensors(contiguous, metadata=header)
        write_durably(path, data, on_temp_written)
        return ArtefactInfo(kind, version, path, len(data), hashlib.sha256(data).hexdigest())

    def read(self, kind: ArtefactKind, version: int, *, expected_sha256: str | None = None) -> Artefact:
        """Read and verify an artefact: the file's sha256 (when expected) and its own tensor digest.

        Raises ArtefactMissing or ArtefactCorrupt, naming the file and what to do.
        """
        path = self.path(kind, version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtefactMissing(
                f"{kind.value} artefact for version {version} is missing ({path}); it was removed or never written"
            ) from None
        sha = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise ArtefactCorrupt(
                f"{path} has sha256 {sha} but the ledger recorded {expected_sha256}; the file was changed or damaged"
            )
        try:
            tensors = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise ArtefactCorrupt(f"{path} is not a readable safetensors file: {exc}") from None
        metadata = read_header_metadata(path)
        _check_metadata(path, metadata, kind, version)
        if tensors_sha256(tensors) != metadata["tensors_sha256"]:
            raise ArtefactCorrupt(f"{path}: the tensors do not match the digest written with them; the file is damaged")
        return Artefact(ArtefactInfo(kind, version, path, len(data), sha), tensors, metadata)

    def metadata(self, kind: ArtefactKind, version: int) -> dict[str, str]:
        """An artefact's metadata from its header (cheap; not verified against the tensors)."""
        path = self.path(kind, version)
        metadata = read_header_metadata(path)
        _check_metadata(path, metadata, kind, version)
        return metadata

    def artefacts(self, kind: ArtefactKind | None = None) -> list[ArtefactInfo]:
        """Artefacts with a final name, ordered by kind and version (temporary files are left out)."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            parsed = _parse_name(path.name)
            if parsed is None or (kind is not None and parsed[0] != kind):
                continue
            found.append(ArtefactInfo(parsed[0], parsed[1], path, path.stat().st_size))
        return sorted(found, key=lambda info: (info.kind.value, info.version))

    def versions(self, kind: ArtefactKind) -> set[int]:
        """The versions that have an artefact of `kind`."""
        return {info.version for info in self.artefacts(kind)}

    def remove(self, kind: ArtefactKind, version: int) -> bool:
        """Delete an artefact (durably); False when it was not there."""
        path = self.path(kind, version)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_directory(self.directory)
        return True

    def remove_orphans(self, known_versions: Collection[int]) -> list[Path]:
        """Delete temporary files and artefacts of versions the ledger does not know; returns what was deleted.

        `known_versions` are every commit version in the ledger, reverted ones included. The genesis
        snapshot (version 0) is never an orphan.
        """
        if not self.directory.is_dir():
            return []
        known = set(known_versions) | {0}
        removed = []
        for path in sorted(self.directory.iterdir()):
            parsed = _parse_name(path.name)
            if path.name.startswith(TEMP_PREFIX) or (parsed is not None and parsed[1] not in known):
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            fsync_directory(self.directory)
        return removed

    def usage(self) -> StorageUsage:
        """Files and bytes per kind."""
        infos = self.artefacts()
        commits = [i.size_bytes for i in infos if i.kind == ArtefactKind.COMMIT]
        snapshots = [i.size_bytes for i in infos if i.kind == ArtefactKind.SNAPSHOT]
        return StorageUsage(len(commits), sum(commits), len(snapshots), sum(snapshots), max(snapshots, default=0))


def _parse_name(name: str) -> tuple[ArtefactKind, int] | None:
    if not name.endswith(SUFFIX) or name.startswith(TEMP_PREFIX):
        return None
    stem = name[: -len(SUFFIX)]
    kind, _, number = stem.partition("-")
    if kind not in {k.value for k in ArtefactKind} or not number.isdigit():
        return None
    return ArtefactKind(kind), int(number)


def _check_metadata(path: Path, metadata: Mapping[str, str], kind: ArtefactKind, version: int) -> None:
    if metadata.get("format") != ARTEFACT_FORMAT:
        raise ArtefactCorrupt(f"{path} is not a {ARTEFACT_FORMAT} file (format {metadata.get('format')!r})")
    schema = int(metadata.get("schema", "0"))
    if schema > SCHEMA_VERSION:
        raise ArtefactError(f"{path} uses artefact schema {schema}; this program reads up to {SCHEMA_VERSION}: upgrade it")
    if metadata.get("kind") != kind.value or metadata.get("version") != str(version):
        raise ArtefactCorrupt(
            f"{path} says it is {metadata.get('kind')} {metadata.get('version')}, not {kind.value} {version}; "
            "it was renamed by hand"
        )
