"""`python -m daemon`: start-up, readiness as JSON, clean exit on SIGTERM/SIGINT, refusal of bad config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_CACHE_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KED_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["KED_MODEL__DEVICE"] = "cpu"
    env["KED_MODEL__CACHE_DIR"] = str(MODEL_CACHE_DIR)
    env["KED_API__PORT"] = "0"
    # These tests are about start-up and signals; first-run training is tested in test_end_to_end.py.
    env["KED_EDIT_LOOP__TRAIN_IF_MISSING"] = "false"
    return env


def test_bad_configuration_exits_2_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[model]\ndtype = "int3"\n')
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(config), "--state-dir", str(tmp_path / "s")],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "model.dtype" in result.stderr and "'int3'" in result.stderr


def _wait_for_ready(proc: subprocess.Popen[str], timeout: float) -> list[dict[str, object]]:
    records: list[dict[str, object]] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        record = json.loads(line)
        records.append(record)
        if record.get("event") == "ready":
            return records
    raise AssertionError(f"no ready line; got {records}")


def _check_running_service(api: str, state: Path) -> None:
    """The API answers, the model answers queries, and a file dropped into the inbox reaches the ledger."""
    assert httpx.get(f"{api}/healthz", timeout=10).status_code == 200
    ready = httpx.get(f"{api}/readyz", timeout=10)
    assert ready.status_code == 503 and any("editor" in r for r in ready.json()["reasons"])
    answer = httpx.post(f"{api}/v1/query", json={"prompt": "The capital of France is", "answers": ["Paris"]}, timeout=60)
    assert answer.status_code == 200 and answer.json()["completion"].startswith(" Paris")
    fact = {"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English", "ground_truth": "French"}
    (state / "inbox" / "one.jsonl").write_text(json.dumps(fact) + "\n")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        facts = httpx.get(f"{api}/v1/facts", timeout=10).json()["facts"]
        if facts:
            break
        time.sleep(0.5)
    assert [f["target_new"] for f in facts] == ["English"]
    assert "ked_facts_ingested_total" in httpx.get(f"{api}/metrics", timeout=10).text


@pytest.mark.real_model
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_starts_logs_ready_as_json_and_exits_on_signal(tmp_path: Path, signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--state-dir", str(tmp_path / "state")],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        records = _wait_for_ready(proc, timeout=240)
        ready = records[-1]
        assert ready["model_type"] == "llama" and ready["level"] == "info"
        assert ready["version"] == 0 and ready["editor"] == "missing"
        if signum == signal.SIGTERM:
            _check_running_service(str(ready["api"]), tmp_path / "state")
        sent = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - sent < 5
        assert (tmp_path / "state").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.real_model
def test_signal_during_start_up_exits_promptly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--state-dir", str(tmp_path / "state")],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        events: list[str] = []
        while not events or events[-1] != "loading model":
            line = proc.stdout.readline()
            assert line, f"daemon ended before loading the model: {events}"
            events.append(json.loads(line)["event"])
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - sent < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
