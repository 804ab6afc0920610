"""`python -m daemon.ledger revert` and `export-model` on a real model state (tiny Llama, SQLite ledger, artefacts).

Offline (the model lock is free): the command loads the model, recovers, reverts exactly and releases
the lock. Online (a "daemon" holds the lock): it checks the target, files the revert in the ledger and
waits for the daemon, played here by a thread that calls `daemon.model_state.apply_pending_reverts`
on its own live model, as the daemon's edit loop does between batches.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.ledger import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, main
from daemon.model_state import apply_pending_reverts
from editing.state.export import EXPORT_INFO_NAME
from editing.state.history import ModelHistory
from store.lock import ModelInUse, ModelLock
from tests.daemon.test_model_state import (  # noqa: F401 - fixtures, registered by importing them
    World,
    logits,
    tiny_model_dir_fixture,
    world_fixture,
    worlds_fixture,
)

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Run]:
    """Run `python -m daemon.ledger` in-process on the world's state directory; returns (exit code, stdout, stderr)."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what the test printed before (the model-state logs of its own history)
        code = main(["--state-dir", str(tmp_path / "state"), *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run
    # main() configures logging for the process; put back what the test runner had.
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    structlog.reset_defaults()


class Daemon:
    """The running daemon's part in a revert: it holds the model lock and applies filed reverts between batches."""

    def __init__(self, world: World, history: ModelHistory | None = None, *, apply: bool = True) -> None:
        self.world = world
        self.history = history
        self.lock = ModelLock(world.state_dir, "daemon")
        self.applied: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True) if apply else None

    def __enter__(self) -> Daemon:
        self.lock.acquire()
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.lock.release()

    def _loop(self) -> None:
        assert self.history is not None
        while not self._stop.wait(0.05):
            try:
                self.applied += apply_pending_reverts(self.history, self.world.sessions)
            except BaseException as exc:  # surfaced by the test's assertions
                self.errors.append(exc)
                return


def assert_lock_free(world: World) -> None:
    lock = ModelLock(world.state_dir, "test")
    lock.acquire()  # raises ModelInUse if the command left it held
    lock.release()


def committed(world: World, count: int) -> ModelHistory:
    history = world.open()
    for seed in range(1, count + 1):
        world.commit(history, seed)
    return history


# --- offline ------------------------------------------------------------------------------------


def test_offline_revert_restores_the_recorded_weights_exactly(world: World, cli: Run) -> None:
    committed(world, 3)
    hashes = {v: world.recorded_hash(v) for v in range(4)}
    assert len(set(hashes.values())) == 4

    code, out, err = cli("revert", "--last", "1", "--json", "--reason", "probe drop")

    assert code == EXIT_OK, err
    result = json.loads(out)
    assert (result["mode"], result["from_version"], result["to_version"]) == ("offline", 3, 2)
    assert (result["reverted_commits"], result["reverted_facts"], result["reason"]) == (1, 2, "probe drop")
    assert result["weights_sha256"] == hashes[2] and result["weights_restored"] is True
    assert result["weights_restored_at"] is not None and result["requested_by"].startswith("cli:")
    statuses = world.statuses()
    assert {statuses[i] for i in world.fact_ids(3)} == {"reverted"}
    assert {statuses[i] for i in world.fact_ids(1) + world.fact_ids(2)} == {"committed"}
    assert_lock_free(world)

    code, out, err = cli("revert", "--to", "v1", "--requested-by", "ops")
    assert code == EXIT_OK, err
    assert out.startswith("revert #2: v2 -> v1, 1 commit(s) and 2 fact(s) reverted; weights of v1 restored exactly")
    assert f"sha256 {hashes[1][:16]}…" in out
    # What the next daemon start rebuilds agrees with the ledger.
    assert world.open().state.weights_sha256() == hashes[1]

    code, out, _ = cli("revert", "--to", "0", "--json")
    assert code == EXIT_OK and json.loads(out)["weights_sha256"] == hashes[0]
    assert world.current_version() == 0 and set(world.statuses().values()) == {"reverted"}
    assert [r.weights_restored_at is not None for r in world.reverts()] == [True, True, True]
    assert_lock_free(world)


@pytest.mark.parametrize("daemon_running", [False, True], ids=["offline", "daemon"])
def test_a_revert_beyond_the_retention_horizon_is_refused_and_changes_nothing(
    worlds: Callable[..., World], cli: Run, daemon_running: bool
) -> None:
    world = worlds(snapshot_every=2, retention_commits=2)
    committed(world, 6)
    before = (world.statuses(), world.artefacts(), world.current_version())
    assert "commit-00000003.safetensors" not in before[1]  # pruned: version 3 can no longer be rebuilt

    holder: AbstractContextManager[Any] = Daemon(world, apply=False) if daemon_running else nullcontext()
    with holder:
        code, out, err = cli("revert", "--to", "3")

    assert (code, out) == (EXIT_REFUSED, "")
    assert "cannot revert to version 3: it is beyond the retention horizon" in err
    assert "the oldest version that can still be rebuilt is 4" in err and "Nothing was changed" in err
    assert (world.statuses(), world.artefacts(), world.current_version()) == before
    assert world.reverts() == []
    assert_lock_free(world)
    if not daemon_running:  # the horizon itself can still be reached, exactly
        code, out, err = cli("revert", "--to", "4", "--json")
        assert code == EXIT_OK, err
        assert json.loads(out)["weights_sha256"] == world.recorded_hash(4)


@pytest.mark.parametrize("daemon_running", [False, True], ids=["offline", "daemon"])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--to", "9"), "cannot revert to version 9: choose one from 0 to 2"),
        (("--to", "3"), "already at version 3"),
        (("--last", "4"), "cannot revert the last 4 commits: only 3 are active"),
    ],
)
def test_an_invalid_target_is_refused_and_changes_nothing(
    world: World, cli: Run, argv: tuple[str, ...], message: str, daemon_running: bool
) -> None:
    committed(world, 3)
    before = world.statuses()
    holder: AbstractContextManager[Any] = Daemon(world, apply=False) if daemon_running else nullcontext()
    with holder:
        code, out, err = cli("revert", *argv)
    assert (code, out) == (EXIT_REFUSED, "")
    assert message in err
    assert world.statuses() == before and world.reverts() == [] and world.current_version() == 3
    assert_lock_free(world)


def test_a_revert_to_a_reverted_version_is_refused(world: World, cli: Run) -> None:
    committed(world, 2)
    assert cli("revert", "--last", "1")[0] == EXIT_OK
    code, _, err = cli("revert", "--to", "2")
    assert code == EXIT_REFUSED and "cannot revert to version 2" in err
    assert len(world.reverts()) == 1


def test_a_damaged_artefact_stops_the_offline_revert_before_the_ledger_changes(world: World, cli: Run) -> None:
    committed(world, 2)
    path = world.settings.artefact_dir() / "commit-00000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    before = world.statuses()

    code, out, err = cli("revert", "--to", "1")

    assert (code, out) == (EXIT_REFUSED, "")
    assert "commit-00000002.safetensors" in err
    assert world.statuses() == before and world.reverts() == [] and world.current_version() == 2
    assert_lock_free(world)


def test_a_model_that_cannot_be_loaded_exits_2_and_releases_the_lock(
    world: World, cli: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    committed(world, 1)
    monkeypatch.setenv("KED_MODEL__SOURCE", str(tmp_path / "no-such-model"))
    code, out, err = cli("revert", "--last", "1")
    assert (code, out) == (EXIT_USAGE, "")
    assert "cannot load model" in err
    assert world.reverts() == [] and world.current_version() == 1
    assert_lock_free(world)


# --- with the daemon running ---------------------------------------------------------------------


def test_with_the_daemon_running_the_revert_is_filed_and_the_daemon_restores_the_weights(
    world: World, cli: Run
) -> None:
    live = committed(world, 3)  # the daemon's live model

    with Daemon(world, live) as daemon:
        code, out, err = cli("revert", "--last", "2", "--wait", "60", "--json")
        with pytest.raises(ModelInUse):  # the command never touched the daemon's lock
            ModelLock(world.state_dir, "test").acquire()

    assert daemon.errors == []
    assert code == EXIT_OK, err
    result = json.loads(out)
    assert (result["mode"], result["from_version"], result["to_version"], result["reverted_commits"]) == (
        "daemon",
        3,
        1,
        2,
    )
    assert result["weights_restored"] is True and result["weights_restored_at"] is not None
    assert daemon.applied == [result["id"]]
    assert live.state.version == 1 and live.state.weights_sha256() == world.recorded_hash(1)
    statuses = world.statuses()
    assert {statuses[i] for i in world.fact_ids(2) + world.fact_ids(3)} == {"reverted"}

    with Daemon(world, live):
        code, out, err = cli("revert", "--to", "0", "--wait", "60")
    assert code == EXIT_OK, err
    assert out.startswith("revert #2: v1 -> v0, 1 commit(s) and 2 fact(s) reverted; the running daemon restored")
    assert live.state.weights_sha256() == world.recorded_hash(0)


def test_when_the_daemon_does_not_apply_it_in_time_the_revert_stays_recorded(world: World, cli: Run) -> None:
    committed(world, 3)

    with Daemon(world, apply=False):
        began = time.monotonic()
        code, out, err = cli("revert", "--to", "1", "--wait", "0.6")
        waited = time.monotonic() - began

    assert code == EXIT_REFUSED and waited >= 0.6
    assert out == "revert #1: v3 -> v1, 2 commit(s) and 4 fact(s) reverted; recorded, waiting for the daemon\n"
    assert "has not restored the weights of v1 within 0.6 s; revert #1 is recorded" in err
    (audit,) = world.reverts()
    assert audit.weights_restored_at is None  # still a request for the daemon
    assert world.current_version() == 1
    # The daemon's next start carries it out.
    assert world.open().state.weights_sha256() == world.recorded_hash(1)
    assert world.reverts()[0].weights_restored_at is not None


def test_a_revert_is_refused_while_another_offline_command_holds_the_model(world: World, cli: Run) -> None:
    committed(world, 2)
    with ModelLock(world.state_dir, "export-model"):
        code, out, err = cli("revert", "--last", "1")
    assert (code, out) == (EXIT_REFUSED, "")
    assert "held by another command (export-model" in err
    assert world.reverts() == [] and world.current_version() == 2


# --- export-model --------------------------------------------------------------------------------


def test_export_model_loads_in_plain_transformers_with_the_logits_of_its_version(
    world: World, cli: Run, tmp_path: Path
) -> None:
    history = world.open()
    tokenizer = world.load().tokenizer
    expected = {0: logits(history.state.model, tokenizer)}
    for version in (1, 2):
        world.commit(history, version)
        expected[version] = logits(history.state.model, tokenizer)
    assert not torch.equal(expected[1], expected[2])  # the edits reach the logits
    del history

    code, out, err = cli("export-model", "--version", "v1", str(tmp_path / "v1"))
    assert code == EXIT_OK, err
    assert out.startswith(f"exported v1 (weights sha256 {world.recorded_hash(1)[:16]}…")
    code, out, err = cli("export-model", "--json", str(tmp_path / "current"))
    assert code == EXIT_OK, err
    assert json.loads(out)["version"] == 2

    for version, folder in ((1, "v1"), (2, "current")):
        # Bit-identical, not allclose: the directory holds the very float32 bytes of the version's
        # weights, and the same architecture on the same CPU and threads runs the same kernels.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        assert torch.equal(logits(reloaded, tokenizer), expected[version])
        info = json.loads((tmp_path / folder / EXPORT_INFO_NAME).read_text())
        assert (info["version"], info["weights_sha256"]) == (version, world.recorded_hash(version))
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "v1")
    assert exported_tokenizer("Paris")["input_ids"] == tokenizer("Paris")["input_ids"]
    assert world.current_version() == 2 and world.reverts() == []  # exporting changes nothing
    assert_lock_free(world)


def test_export_model_is_readable_by_other_users_like_any_file_written_under_the_umask(
    world: World, cli: Run, tmp_path: Path
) -> None:
    """A model server running as another user can read the export: 0755 / 0644 under umask 022, not 0700 / 0600."""
    committed(world, 1)
    previous = os.umask(0o022)
    try:
        code, _, err = cli("export-model", str(tmp_path / "out"))
    finally:
        os.umask(previous)
    assert code == EXIT_OK, err
    out = tmp_path / "out"
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_export_model_of_a_reverted_version_rebuilds_it_from_its_artefacts(
    world: World, cli: Run, tmp_path: Path
) -> None:
    committed(world, 2)
    assert cli("revert", "--last", "1")[0] == EXIT_OK
    code, out, err = cli("export-model", "--version", "2", "--json", str(tmp_path / "v2"))
    assert code == EXIT_OK, err
    assert json.loads(out)["weights_sha256"] == world.recorded_hash(2) != world.recorded_hash(1)
    assert world.current_version() == 1  # the ledger and the live version stay where the revert put them


def test_export_model_runs_while_the_daemon_holds_the_model(world: World, cli: Run, tmp_path: Path) -> None:
    committed(world, 1)
    with Daemon(world, apply=False):
        code, out, err = cli("export-model", "--json", str(tmp_path / "out"))
    assert code == EXIT_OK, err
    assert json.loads(out)["weights_sha256"] == world.recorded_hash(1)


def test_export_model_refusals(worlds: Callable[..., World], cli: Run, tmp_path: Path) -> None:
    world = worlds(snapshot_every=2, retention_commits=2)
    committed(world, 6)
    code, _, err = cli("export-model", "--version", "9", str(tmp_path / "a"))
    assert code == EXIT_REFUSED and "no commit with version 9 in the ledger" in err
    code, _, err = cli("export-model", "--version", "3", str(tmp_path / "a"))
    assert code == EXIT_REFUSED and "cannot export version 3: it is beyond the retention horizon" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, _, err = cli("export-model", str(taken))
    assert code == EXIT_USAGE and "is not an empty directory" in err
    assert not (tmp_path / "a").exists() and sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    assert_lock_free(world)
