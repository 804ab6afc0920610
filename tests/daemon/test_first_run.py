"""First-run training (`daemon.first_run`) and the daemon process around it, on a tiny model.

The daemon is run as a real subprocess (`python -m daemon`) on a tiny Llama saved as a local model
directory, so that training, editing and a SIGTERM in the middle of a batch take seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.bootstrap import load_editor
from daemon.first_run import TrainingStopped, checkpoint_exists, train_editor
from editing.engine.checkpoint import load_checkpoint
from tests.daemon.test_model_state import EDIT_MODULES, World, tiny_model_dir_fixture, world_fixture, worlds_fixture

__all__ = ["tiny_model_dir_fixture", "world_fixture", "worlds_fixture"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _small(world: World, batches: int = 2) -> Any:
    return world.settings.model_copy(
        update={
            "edit_loop": world.settings.edit_loop.model_copy(update={"training_batches": batches}),
            "editor": world.settings.editor.model_copy(update={"batch_size": 4, "rank": 8, "n_blocks": 1}),
        }
    )


def test_training_writes_a_checkpoint_that_loads_for_the_model(world: World) -> None:
    settings = _small(world)
    loaded = world.load()
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    seen: list[tuple[int, int]] = []
    path = train_editor(
        settings, loaded, EDIT_MODULES, progress=lambda d, t, loss: seen.append((d, t)), stop=threading.Event()
    )
    assert path == settings.editor_checkpoint() and checkpoint_exists(path)
    assert seen == [(1, 2), (2, 2)]
    assert not path.with_name(path.name + ".partial").exists()
    info = load_checkpoint(path).info
    assert info.model_fingerprint == loaded.fingerprint and sorted(info.modules) == sorted(EDIT_MODULES)
    assert info.training["trained_by"] == "daemon first run" and info.training["n_examples"] == 8
    # Training ran on a copy: the live model is untouched.
    after = loaded.model.state_dict()
    assert all(bool((before[k] == after[k]).all()) for k in before)
    editor = load_editor(settings, loaded, EDIT_MODULES)
    assert sorted(editor.module_names) == sorted(EDIT_MODULES)


def test_a_stop_during_training_saves_nothing(world: World) -> None:
    settings = _small(world, batches=3)
    stop = threading.Event()
    with pytest.raises(TrainingStopped):
        train_editor(settings, world.load(), EDIT_MODULES, progress=lambda d, t, loss: stop.set(), stop=stop)
    assert not checkpoint_exists(settings.editor_checkpoint())


def _env(model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KED_")}
    env |= {
        "PYTHONPATH": str(REPO_ROOT),
        "KED_MODEL__SOURCE": str(model_dir),
        "KED_MODEL__DEVICE": "cpu",
        "KED_MODEL__EDIT_MODULES": json.dumps(EDIT_MODULES),
        "KED_API__PORT": "0",
        "KED_LOGGING__FORMAT": "json",
        "KED_EDITOR__BATCH_SIZE": "4",
        "KED_EDITOR__RANK": "8",
        "KED_EDITOR__N_BLOCKS": "1",
        "KED_EDIT_LOOP__TRAINING_BATCHES": "2",
        "KED_EDIT_LOOP__MIN_BATCH": "1",
        "KED_EDIT_LOOP__POLL_SECONDS": "0.2",
        "KED_INGEST__DROP_FOLDER_INTERVAL_SECONDS": "0.5",
        "KED_GATE__SPECIFICITY_PROMPTS": "4",
    }
    return env | extra


def _statuses(state: Path) -> dict[str, int]:
    db = sqlite3.connect(state / "ledger.sqlite3")
    try:
        return dict(db.execute("SELECT status, count(*) FROM facts GROUP BY status").fetchall())
    finally:
        db.close()


def _lines(proc: subprocess.Popen[str], until: str, timeout: float) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
        if records[-1].get("event") == until:
            return records
    raise AssertionError(f"no {until!r}; got {[r.get('event') for r in records][-10:]}")


@pytest.mark.slow
def test_sigterm_during_a_batch_rolls_it_back_and_exits_0(tmp_path: Path, tiny_model_dir: Path) -> None:
    state = tmp_path / "state"
    # Per-batch thresholds no edit can meet: isolation re-edits every subset, so the batch is long enough to
    # receive the signal in the middle of it. The cumulative budget stays loose: were it the one failing, a
    # batch whose own change passes would end `blocked` at once and pause editing, so no batch would be
    # in flight to interrupt.
    env = _env(
        tiny_model_dir,
        KED_GATE__MIN_BATCH_AGREEMENT="1.0",
        KED_GATE__MAX_BATCH_KL="0.0000001",
        KED_GATE__MIN_AGREEMENT="0",
        KED_GATE__MAX_KL="1000",
        KED_GATE__MIN_EFFICACY="0",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--state-dir", str(state)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        ready = _lines(proc, "ready", 120)[-1]
        api = str(ready["api"])
        _lines(proc, "editor ready", 120)
        assert httpx.get(f"{api}/v1/status", timeout=10).json()["editor"]["state"] == "ready"
        facts = [{"prompt": f"The capital of country {i} is", "target_new": f"Paris {i}"} for i in range(8)]
        (state / "inbox" / "f.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
        # Wait until the facts are in the ledger, then try to catch a batch in flight; a tiny model can
        # finish a batch between two polls, so the signal goes out either way (the assertions below hold
        # whether it lands in a batch or between batches).
        deadline = time.monotonic() + 60
        while not _statuses(state):
            assert time.monotonic() < deadline, "the facts were never ingested"
            time.sleep(0.01)
        deadline = time.monotonic() + 10
        while _statuses(state).get("editing", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - sent < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    statuses = _statuses(state)
    assert "editing" not in statuses  # rolled back to pending (or settled, had the batch just finished)
    assert sum(statuses.values()) == 8


@pytest.mark.slow
def test_first_run_trains_then_edits_and_a_restart_keeps_the_editor(tmp_path: Path, tiny_model_dir: Path) -> None:
    state = tmp_path / "state"
    env = _env(tiny_model_dir, KED_GATE__ENABLED="false")
    for run in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--state-dir", str(state)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            records = _lines(proc, "ready", 120)
            api = str(records[-1]["api"])
            if run == 0:
                assert records[-1]["editor"] == "training"
                trained = _lines(proc, "editor ready", 120)
                assert [r["batch"] for r in trained if r.get("event") == "editor training"] == [1, 2]
                fact = {"prompt": "The capital of country 1 is", "target_new": "Paris 1"}
                (state / "inbox" / "f.jsonl").write_text(json.dumps(fact) + "\n")
                _lines(proc, "batch done", 120)
                metrics = httpx.get(f"{api}/metrics", timeout=10).text
                assert "ked_facts_committed_total 1.0" in metrics
                assert "ked_editor_training_progress_ratio 1.0" in metrics
            else:
                assert records[-1]["editor"] == "ready" and records[-1]["version"] == 1
                assert httpx.get(f"{api}/readyz", timeout=10).status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert _statuses(state) == {"committed": 1}
