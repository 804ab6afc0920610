"""End to end with the real default model: `python -m daemon` on a fresh state directory.

First-run training, 32 counterfactual facts dropped as a JSONL file, committed by the edit loop,
answered by /v1/query, counted by the metrics; `python -m daemon.ledger revert --last 1` while the
daemon runs; a restart that keeps everything; a revert to the base model that brings back exactly
the answers from before any edit.

Settings that differ from the defaults, and why: first-run training is cut to 2 batches (the full 32
take minutes on this CPU; the edits below do not depend on it), and the gate's specificity budgets
(per batch and cumulative) are loosened, because at the defaults this editor's CounterFact edits use up
the cumulative budget within a few batches (bench/results/service.md reports that); this test is about
the service's mechanics. The efficacy threshold stays at its default, so every committed fact's target is what greedy
decoding produces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_CACHE_DIR
from tests.daemon.test_dashboard import has_data, panel_problems, prometheus, prometheus_bin, wait_for

__all__ = ["prometheus", "prometheus_bin"]  # fixtures

REPO_ROOT = Path(__file__).resolve().parents[2]
FACTS = 32


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KED_")}
    env |= {
        "PYTHONPATH": str(REPO_ROOT),
        "KED_MODEL__DEVICE": "cpu",
        "KED_MODEL__CACHE_DIR": str(MODEL_CACHE_DIR),
        "KED_API__PORT": "0",
        "KED_EDIT_LOOP__TRAINING_BATCHES": "2",
        "KED_EDIT_LOOP__MAX_WAIT_SECONDS": "2",
        "KED_EDIT_LOOP__POLL_SECONDS": "0.5",
        "KED_INGEST__DROP_FOLDER_INTERVAL_SECONDS": "1",
        "KED_GATE__MIN_AGREEMENT": "0.5",
        "KED_GATE__MAX_KL": "5.0",
        "KED_GATE__MIN_BATCH_AGREEMENT": "0.5",
        "KED_GATE__MAX_BATCH_KL": "5.0",
        # A source that always fails (nothing listens on port 9): its health and failures reach the dashboard.
        "KED_INGEST__JSONL": json.dumps(
            [{"name": "unreachable", "location": "http://127.0.0.1:9/facts.jsonl", "interval_seconds": 1}]
        ),
    }
    return env


class Daemon:
    """A `python -m daemon` process and its API."""

    def __init__(self, state: Path, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--state-dir", str(state)],
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.records: list[dict[str, Any]] = []
        self.ready = self._wait_for("ready", 300)
        self.api = str(self.ready["api"])
        # Keep reading the daemon's log: a pipe nobody reads fills up (64 KiB) and blocks the daemon's
        # next log line, and with it whatever thread was logging (the edit loop, say).
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                self.records.append({"raw": line.rstrip()})

    def _wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            record = json.loads(line)
            self.records.append(record)
            if record.get("event") == event:
                return record  # type: ignore[no-any-return]
        raise AssertionError(f"no {event!r} line; last lines: {self.records[-5:]}")

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.api}{path}", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def complete(self, prompt: str) -> str:
        response = httpx.post(f"{self.api}/v1/query", json={"prompt": prompt, "max_new_tokens": 8}, timeout=120)
        assert response.status_code == 200, response.text
        return str(response.json()["completion"])

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.api}/metrics", timeout=30).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    def wait_until(self, what: str, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(1)
        last = [r.get("event") for r in self.records[-20:]]
        raise AssertionError(f"timed out waiting for {what}; status: {self.get('/v1/status')}; last log events: {last}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=120) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _ledger(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.ledger", "--state-dir", str(state), *args],
        cwd=state.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _starts_with(completion: str, target: str) -> bool:
    return completion.strip().startswith(target.strip())


@pytest.mark.real_model
@pytest.mark.slow
def test_drop_commit_query_revert_restart(
    tmp_path: Path, shared_data: Path, prometheus: Callable[[str], str]
) -> None:
    records = json.loads((shared_data / "counterfact" / "counterfact_val.json").read_text())[:FACTS]
    state = tmp_path / "state"
    daemon = Daemon(state, tmp_path)
    try:
        before = {r["prompt"]: daemon.complete(r["prompt"]) for r in records}
        # First run: the editor is trained in the background, then /readyz turns 200.
        daemon.wait_until("the editor", lambda: httpx.get(f"{daemon.api}/readyz", timeout=30).status_code == 200, 600)
        assert daemon.metric("ked_editor_training_progress_ratio") == 1.0
        assert (state / "editor" / "editor_config.json").is_file()

        # A real Prometheus scrapes the daemon from here on; the dashboard's queries are checked below.
        prom = prometheus(daemon.api.removeprefix("http://"))
        wait_for(lambda: has_data(prom, 'up{job="ked"} == 1'), 60, "Prometheus never scraped the daemon")
        drop = state / "inbox" / "counterfacts.jsonl"
        bad = json.dumps({"prompt": "A record with no target"})  # rejected, with its line, and counted
        drop.with_suffix(".part").write_text("".join(json.dumps(r) + "\n" for r in records) + bad + "\n")
        drop.with_suffix(".part").rename(drop)
        daemon.wait_until(
            "the facts to be committed",
            lambda: daemon.get("/v1/status")["ledger"]["facts"]["committed"] == FACTS,
            900,
        )
        commits = daemon.get("/v1/commits")["commits"]
        versions = sorted(c["version"] for c in commits)
        assert len(versions) >= 2 and sum(c["fact_count"] for c in commits) == FACTS
        newest = max(commits, key=lambda c: c["version"])
        by_id = {f["id"]: f for f in daemon.get(f"/v1/facts?limit={FACTS}")["facts"]}
        answered = {_id_of(by_id, r): _starts_with(daemon.complete(r["prompt"]), r["target_new"]) for r in records}
        # Every fact of the newest commit passed the gate's efficacy check on exactly these weights; the
        # gate scores in padded batches, so a near-tie token may still come out differently when a single
        # prompt is decoded: most, not all, must answer with their target.
        assert sum(answered[i] for i in newest["fact_ids"]) >= 0.9 * len(newest["fact_ids"]), answered
        # Earlier commits' facts can be disturbed by later edits (sequential interference, measured in
        # bench/results/editing_zsre.md); most must still answer with their new target.
        assert sum(answered.values()) >= 0.9 * FACTS, answered
        # Rates of the batch histograms are NaN once no batch ran in the last minute, and the revert series
        # exist only after a revert: every panel must return data either now or after the revert below.
        missing_now = {problem.split(":")[0] for problem in panel_problems(prom)}
        assert daemon.metric("ked_facts_committed_total") == FACTS
        assert daemon.metric("ked_model_version") == versions[-1]
        exposition = httpx.get(f"{daemon.api}/metrics", timeout=30).text
        assert f'ked_facts_ingested_total{{source="inbox"}} {float(FACTS)}' in exposition
        assert 'ked_facts_rejected_total{reason="missing_field",source="inbox"} 1.0' in exposition, exposition

        # Revert the newest commit with the daemon running: the CLI files it, the daemon applies it.
        reverted = set(newest["fact_ids"])
        at_parent = next(c for c in commits if c["version"] == newest["parent_version"])
        result = _ledger(state, "revert", "--last", "1", "--reason", "end-to-end test")
        assert result.returncode == 0, result.stderr
        status = daemon.get("/v1/status")
        assert status["ledger"]["model_version"] == versions[-2]
        by_id = {f["id"]: f for f in daemon.get(f"/v1/facts?limit={FACTS}")["facts"]}
        assert {i for i, f in by_id.items() if f["status"] == "reverted"} == reverted
        # The parent version's weights are bit-identical to when its commit passed the gate.
        still = [r for r in records if _id_of(by_id, r) in set(at_parent["fact_ids"])]
        assert still
        at_parent_answers = {r["prompt"]: daemon.complete(r["prompt"]) for r in records}
        hits = sum(_starts_with(at_parent_answers[r["prompt"]], r["target_new"]) for r in still)
        assert hits >= 0.9 * len(still), at_parent_answers
        time.sleep(3)  # a few scrapes after the revert
        problems = [p for p in panel_problems(prom) if p.split(":")[0] in missing_now]
        assert not problems, "\n".join(problems)
        daemon.stop()

        # A restart rebuilds the same version from the artefacts and keeps every fact's state.
        daemon = Daemon(state, tmp_path)
        assert daemon.ready["version"] == versions[-2]
        assert daemon.get("/v1/status")["ledger"]["facts"]["reverted"] == len(reverted)
        # Rebuilt from the artefacts, the weights are the same bits: every answer is the same as before.
        assert {r["prompt"]: daemon.complete(r["prompt"]) for r in records} == at_parent_answers

        # Back to the base model: exactly the answers from before any edit.
        result = _ledger(state, "revert", "--to", "0", "--reason", "back to base")
        assert result.returncode == 0, result.stderr
        after = {r["prompt"]: daemon.complete(r["prompt"]) for r in records}
        assert after == before
        daemon.stop()
    finally:
        daemon.kill()


def _id_of(facts: dict[int, dict[str, Any]], record: dict[str, Any]) -> int:
    return next(i for i, f in facts.items() if f["prompt"] == record["prompt"] and f["target_new"] == record["target_new"])
