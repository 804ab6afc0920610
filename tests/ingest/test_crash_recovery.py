"""Kill the drop-folder ingestion with SIGKILL at every named step (and at random times), restart it,
and check that the ledger holds every fact, arrival and rejection exactly once and every file moved.

Scenario for each case:
1. Three files wait in the inbox: a.jsonl (12 facts, 3 bad lines), b.json (8 facts, 2 of them
   already in a.jsonl), c.jsonl (3 bad lines only). Records are committed 4 at a time.
2. A real subprocess scans the folder and is killed with SIGKILL at the named step.
3. A new subprocess scans again and finishes.
Result: 18 facts, 20 arrivals, 6 rejections; a.jsonl and b.json in processed/, c.jsonl in rejected/.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store.db import make_engine, make_session_factory
from tests.conftest import REPO_ROOT
from tests.ingest.conftest import counts

EXPECTED = (18, 20, 6)


def fact(i: int) -> str:
    return json.dumps({"prompt": f"The capital of country {i} is", "target_new": f"City {i}"})


def make_inbox(folder: Path) -> None:
    folder.mkdir()
    a = [fact(i) for i in range(12)]
    for at, bad in ((2, "{broken"), (7, '{"prompt": "p", "target_new": "  "}'), (13, '"a string"')):
        a.insert(at, bad)
    (folder / "a.jsonl").write_text("\n".join(a) + "\n")
    (folder / "b.json").write_text("[" + ", ".join(fact(i) for i in range(10, 18)) + "]")
    (folder / "c.jsonl").write_text('{"prompt": ""}\n[1]\nnope\n')
    for age, name in enumerate(("c.jsonl", "b.json", "a.jsonl")):  # process a, then b, then c
        os.utime(folder / name, (time.time() - 100 - age, time.time() - 100 - age))


def run_driver(url: str, folder: Path, *crash: str, commit_every: int = 4) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tests.ingest.crash_driver", url, str(folder), str(commit_every), *crash]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)


def assert_exactly_once(url: str, folder: Path) -> None:
    engine = make_engine(url)
    try:
        assert counts(make_session_factory(engine)) == EXPECTED
    finally:
        engine.dispose()
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == []
    assert sorted(p.name for p in (folder / "processed").iterdir()) == ["a.jsonl", "a.jsonl.report.json", "b.json"]
    assert sorted(p.name for p in (folder / "rejected").iterdir()) == ["c.jsonl", "c.jsonl.report.json"]


@pytest.mark.parametrize(
    "crash",
    [
        ("read", "1"),  # before anything is committed
        ("committed", "1"),  # after the first chunk of a.jsonl
        ("reported", "1"),  # report written, file not moved
        ("moved", "1"),  # a.jsonl moved, b.json untouched
        ("committed", "5"),  # in the middle of b.json
        ("reported", "3"),  # c.jsonl: rejection committed and reported, not moved
    ],
)
def test_kill_at_step_then_restart(tmp_path: Path, crash: tuple[str, str]) -> None:
    url, folder = f"sqlite:///{tmp_path}/l.sqlite3", tmp_path / "inbox"
    make_inbox(folder)
    killed = run_driver(url, folder, *crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = run_driver(url, folder)
    assert finished.returncode == 0, finished.stderr
    assert_exactly_once(url, folder)


def test_killed_twice_then_restart(tmp_path: Path) -> None:
    url, folder = f"sqlite:///{tmp_path}/l.sqlite3", tmp_path / "inbox"
    make_inbox(folder)
    assert run_driver(url, folder, "committed", "2").returncode == -signal.SIGKILL
    assert run_driver(url, folder, "committed", "2").returncode == -signal.SIGKILL
    assert run_driver(url, folder).returncode == 0
    assert_exactly_once(url, folder)


def test_kill_at_random_times(tmp_path: Path) -> None:
    """Kills from outside after a random delay, with one record per transaction so they land mid-file."""
    url, folder = f"sqlite:///{tmp_path}/l.sqlite3", tmp_path / "inbox"
    make_inbox(folder)
    rng = random.Random(4)
    command = [sys.executable, "-m", "tests.ingest.crash_driver", url, str(folder), "1"]
    for _ in range(3):
        with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    assert run_driver(url, folder).returncode == 0
    assert_exactly_once(url, folder)
