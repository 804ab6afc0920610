"""The artefact store: durable writes, verified reads, orphans, usage; the model lock across processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from store.artefacts import (
    TEMP_PREFIX,
    ArtefactCorrupt,
    ArtefactError,
    ArtefactKind,
    ArtefactMissing,
    ArtefactStore,
    tensors_sha256,
)
from store.lock import ModelInUse, ModelLock

REPO = Path(__file__).resolve().parents[2]
COMMIT, SNAPSHOT = ArtefactKind.COMMIT, ArtefactKind.SNAPSHOT


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "delta/model.layers.1.mlp.up_proj/a": torch.randint(-99, 99, (6, 3), generator=gen).to(torch.int16),
        "editor/nets.0.normaliser.count": torch.tensor(7.0, dtype=torch.float64),
        "master/x": torch.randn(4, 5, generator=gen).to(torch.bfloat16),
    }


def test_write_then_read_round_trips_tensors_metadata_and_hash(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path / "artefacts")
    tensors = _tensors()
    info = store.write(COMMIT, 3, tensors, {"parent": "2"})

    assert info.path == tmp_path / "artefacts" / "commit-00000003.safetensors"
    assert info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()
    assert info.size_bytes == info.path.stat().st_size
    art = store.read(COMMIT, 3, expected_sha256=info.sha256)
    assert set(art.tensors) == set(tensors) and all(torch.equal(art.tensors[k], v) for k, v in tensors.items())
    assert art.metadata["parent"] == "2" and art.metadata["kind"] == "commit" and art.metadata["version"] == "3"
    assert store.metadata(COMMIT, 3)["tensors_sha256"] == tensors_sha256(tensors)
    assert not [p for p in store.directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_listing_versions_and_usage(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path)
    assert store.artefacts() == [] and store.usage().total_bytes == 0
    sizes = [store.write(COMMIT, v, _tensors(v), {}).size_bytes for v in (1, 2, 5)]
    snap = store.write(SNAPSHOT, 0, {}, {}).size_bytes
    (tmp_path / "notes.txt").write_text("not an artefact")
    assert [(i.kind, i.version) for i in store.artefacts()] == [(COMMIT, 1), (COMMIT, 2), (COMMIT, 5), (SNAPSHOT, 0)]
    assert store.versions(COMMIT) == {1, 2, 5}
    usage = store.usage()
    assert (usage.commit_files, usage.commit_bytes, usage.snapshot_bytes) == (3, sum(sizes), snap)
    assert usage.mean_commit_bytes == sum(sizes) / 3
    big = store.write(SNAPSHOT, 5, {"master/x": torch.zeros(100, 100)}, {}).size_bytes
    assert store.usage().bytes_per_commit(snapshot_every=4) == sum(sizes) / 3 + big / 4


def test_versions_are_never_overwritten_and_reserved_keys_refused(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path)
    store.write(COMMIT, 1, _tensors(), {})
    with pytest.raises(ArtefactError, match="never reused"):
        store.write(COMMIT, 1, _tensors(1), {})
    with pytest.raises(ValueError, match="reserved"):
        store.write(COMMIT, 2, _tensors(), {"version": "9"})


def test_damage_is_detected_with_and_without_the_ledger_hash(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path)
    info = store.write(COMMIT, 1, _tensors(), {})
    data = bytearray(info.path.read_bytes())
    data[-3] ^= 0x40  # one bit in the tensor data
    info.path.write_bytes(bytes(data))
    with pytest.raises(ArtefactCorrupt, match="ledger recorded"):
        store.read(COMMIT, 1, expected_sha256=info.sha256)
    with pytest.raises(ArtefactCorrupt, match="damaged"):
        store.read(COMMIT, 1)
    info.path.write_bytes(b"\x01\x02")
    with pytest.raises(ArtefactCorrupt):
        store.read(COMMIT, 1)
    with pytest.raises(ArtefactMissing, match="version 2 is missing"):
        store.read(COMMIT, 2)


def test_a_renamed_file_is_not_taken_for_another_version(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path)
    store.write(COMMIT, 1, _tensors(), {})
    store.path(COMMIT, 1).rename(store.path(COMMIT, 2))
    with pytest.raises(ArtefactCorrupt, match="renamed"):
        store.read(COMMIT, 2)


def test_remove_orphans_keeps_known_versions_and_the_genesis(tmp_path: Path) -> None:
    store = ArtefactStore(tmp_path)
    for version in (1, 2, 3):
        store.write(COMMIT, version, _tensors(version), {})
    store.write(SNAPSHOT, 0, {}, {})
    store.write(SNAPSHOT, 3, _tensors(), {})
    (tmp_path / f"{TEMP_PREFIX}commit-00000004.safetensors-abc").write_bytes(b"partial")
    removed = store.remove_orphans({1, 2})
    assert sorted(p.name for p in removed) == sorted(
        [f"{TEMP_PREFIX}commit-00000004.safetensors-abc", "commit-00000003.safetensors", "snapshot-00000003.safetensors"]
    )
    assert [(i.kind, i.version) for i in store.artefacts()] == [(COMMIT, 1), (COMMIT, 2), (SNAPSHOT, 0)]
    assert store.remove(COMMIT, 1) and not store.remove(COMMIT, 1)


_WRITER = """
import os, sys, time, torch
from pathlib import Path
from store.artefacts import ArtefactKind, ArtefactStore
def pause():
    print("TEMP", flush=True)
    if sys.argv[2] == "temp":
        time.sleep(600)
store = ArtefactStore(Path(sys.argv[1]))
store.write(ArtefactKind.COMMIT, 1, {"x": torch.arange(1_000_000, dtype=torch.float32)}, {}, on_temp_written=pause)
print("RENAMED", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("kill_at", ["temp", "renamed"])
def test_sigkill_during_a_write_leaves_no_partial_artefact(kill_at: str, tmp_path: Path) -> None:
    """A writer killed before the rename leaves only a temporary file (an orphan); after it, a whole artefact."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WRITER), str(tmp_path), kill_at],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    wanted = "TEMP" if kill_at == "temp" else "RENAMED"
    for line in child.stdout:
        if line.strip() == wanted:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    store = ArtefactStore(tmp_path)
    if kill_at == "temp":
        assert store.artefacts() == []
        assert [p.name[: len(TEMP_PREFIX)] for p in store.remove_orphans(set())] == [TEMP_PREFIX]
    else:
        assert torch.equal(store.read(COMMIT, 1).tensors["x"], torch.arange(1_000_000, dtype=torch.float32))
    assert not any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir())


_HOLDER = """
import sys, time
from pathlib import Path
from store.lock import ModelLock
with ModelLock(Path(sys.argv[1]), "daemon"):
    print("HELD", flush=True)
    time.sleep(600)
"""


def test_the_model_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "HELD"
    try:
        with pytest.raises(ModelInUse, match=rf"pid {child.pid}, daemon"), ModelLock(tmp_path, "offline revert"):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    with ModelLock(tmp_path, "offline revert") as lock:  # the kernel released the dead holder's lock
        assert lock.held
        assert json.loads((tmp_path / "model.lock.holder").read_text())["pid"] == os.getpid()
    assert not lock.held
