"""The whole service, end to end: files of facts dropped into a running `python -m daemon` until committed.

Starts the daemon (default settings unless overridden below) on a fresh state directory, waits until
it is ready, then drops the facts as JSONL files into its drop folder (all at once, like a bulk import)
and waits until every fact is settled (committed, rejected or failed). For each committed fact, the
latency is the time from its file landing in the drop folder to the ledger time of the commit that
applied it. Peak memory is the daemon process's high-water RSS (VmHWM).

    .venv/bin/python -m bench.service [--facts 512] [--per-file 32] [--editor PATH] [--data ../shared/data]

`--editor` copies a trained editor checkpoint into the state directory (otherwise the daemon trains one
on first run, which is timed separately and reported). Writes bench/results/service.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def _env(cache: Path, overrides: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KED_")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "KED_MODEL__CACHE_DIR": str(cache),
        "KED_API__PORT": "0",
        "KED_LOGGING__FORMAT": "json",
        "KED_INGEST__DROP_FOLDER_INTERVAL_SECONDS": "1",
    }
    for item in overrides:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _wait_ready(proc: subprocess.Popen[str], log: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    with log.open("w") as out:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the daemon ended before it was ready; see {log}")
            out.write(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "ready":
                return dict(record)


def _drain(proc: subprocess.Popen[str], log: Path) -> None:
    # Keep reading the daemon's log so that its pipe never fills up.
    def pump() -> None:
        assert proc.stdout is not None
        with log.open("a") as out:
            for line in proc.stdout:
                out.write(line)

    threading.Thread(target=pump, daemon=True).start()


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = json.loads((args.data / "zsre" / "zsre_dev.json").read_text())[: args.facts]
    work = Path(tempfile.mkdtemp(prefix="ked-bench-service-"))
    state = work / "state"
    state.mkdir()
    if args.editor:
        shutil.copytree(args.editor, state / "editor")
    log = work / "daemon.log"
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--state-dir", str(state)],
        cwd=work, env=_env(args.cache, args.env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        ready = _wait_ready(proc, log)
        _drain(proc, log)
        api = str(ready["api"])
        startup = time.monotonic() - began
        while httpx.get(f"{api}/readyz", timeout=30).status_code != 200:
            time.sleep(1)
        editor_ready = time.monotonic() - began
        landed: dict[str, float] = {}
        paused: list[str] = []
        for start in range(0, len(data), args.per_file):
            name = f"facts-{start:05d}.jsonl"
            part = state / "inbox" / (name + ".part")
            part.write_text("".join(json.dumps(r) + "\n" for r in data[start : start + args.per_file]))
            part.rename(state / "inbox" / name)
            landed[name] = time.time()
        drop_began = min(landed.values())
        while True:
            ledger = httpx.get(f"{api}/v1/status", timeout=30).json()["ledger"]
            facts = ledger["facts"]
            # Every record is accounted for (a fact, a duplicate of one, or an ingest rejection) and no
            # fact is waiting or being edited any more.
            stored = sum(facts.values()) + ledger["rejections"]
            status = httpx.get(f"{api}/v1/status", timeout=30).json()
            if status["paused"]:  # the drift policy (or the gate) stopped editing: the run ends here
                paused = status["reasons"]
                break
            if (stored >= len(data) and facts["pending"] + facts["editing"] == 0) or (
                time.monotonic() - began > args.timeout
            ):
                break
            time.sleep(2)
        facts = facts | {"ingest_rejections": ledger["rejections"]}
        peak = _peak_rss(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    result = _report(args, state, landed, drop_began, facts, peak, startup, editor_ready, work)
    result["paused"] = paused
    return result


def _report(
    args: argparse.Namespace, state: Path, landed: dict[str, float], drop_began: float, facts: dict[str, int],
    peak: int, startup: float, editor_ready: float, work: Path,
) -> dict[str, Any]:
    db = sqlite3.connect(state / "ledger.sqlite3")
    rows = db.execute(
        "SELECT o.location, c.created_at FROM facts f JOIN commits c ON c.version = f.commit_version "
        "JOIN fact_origins o ON o.fact_id = f.id WHERE f.status = 'committed'"
    ).fetchall()
    gate = db.execute("SELECT scores FROM probe_runs WHERE kind = 'gate'").fetchall()
    commits = db.execute("SELECT edit_metrics FROM commits").fetchall()
    db.close()
    latencies = []
    last = drop_began
    for location, created in rows:
        name = Path(location).name
        if not created or name not in landed:
            continue
        committed_utc = _utc_seconds(created)  # SQLite stores UTC without a zone
        latencies.append(committed_utc - landed[name])
        last = max(last, committed_utc)
    edit = [json.loads(m)["edit_seconds"] for (m,) in commits if m and "edit_seconds" in json.loads(m)]
    gate_s = [json.loads(m)["gate_seconds"] for (m,) in commits if m and "gate_seconds" in json.loads(m)]
    span = max(last - drop_began, 1e-9)
    return {
        "facts": args.facts,
        "per_file": args.per_file,
        "committed": facts["committed"],
        "rejected": facts["rejected"],
        "failed": facts["failed"],
        "ingest_rejections": facts["ingest_rejections"],
        "pending_left": facts["pending"] + facts["editing"],
        "latency_median_seconds": round(statistics.median(latencies), 2) if latencies else None,
        "latency_max_seconds": round(max(latencies), 2) if latencies else None,
        "facts_per_minute": round(len(latencies) / span * 60.0, 2),
        "peak_rss_bytes": peak,
        "startup_seconds": round(startup, 2),
        "first_run_training": not args.editor,
        "ready_seconds": round(editor_ready, 2),
        "commits": len(commits),
        "gate_runs": len(gate),
        "median_edit_seconds_per_commit": round(statistics.median(edit), 2) if edit else None,
        "median_gate_seconds_per_commit": round(statistics.median(gate_s), 2) if gate_s else None,
        "editor": str(args.editor) if args.editor else "trained on first run",
        "settings": args.env or "defaults",
        "load_average_at_end": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "state_dir": str(work),
    }


def _utc_seconds(text: str) -> float:
    value = datetime.fromisoformat(text)
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return value.timestamp()


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        "# The service end to end (generated by `bench/service.py`)",
        "",
        f"Command: `{command}`. SmolLM2-135M-Instruct on CPU ({result['cpus']} cores, load average at the end "
        f"{result['load_average_at_end'][0]:.1f}); settings: {result['settings']}; editor: {result['editor']}.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key in (
        "facts", "per_file", "committed", "rejected", "failed", "ingest_rejections", "pending_left", "latency_median_seconds",
        "latency_max_seconds", "facts_per_minute", "peak_rss_bytes", "startup_seconds", "ready_seconds", "commits",
        "median_edit_seconds_per_commit", "median_gate_seconds_per_commit",
    ):
        lines.append(f"| {key} | {result[key]} |")
    lines += ["", "Latency: from the file landing in the drop folder to the commit that applied the fact.", ""]
    if result.get("paused"):
        lines += [f"The run ended because the daemon paused editing: {'; '.join(result['paused'])}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=512)
    parser.add_argument("--per-file", type=int, default=32)
    parser.add_argument("--editor", type=Path, default=None, help="trained editor checkpoint to use")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("KED_SHARED_DATA", DEFAULT_DATA)))
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--timeout", type=float, default=3 * 3600)
    parser.add_argument("--out", type=Path, default=RESULTS / "service.json")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KED_KEY=VALUE", help="a setting for the daemon (repeatable)"
    )
    args = parser.parse_args()
    result = run(args)
    command = "python -m bench.service " + " ".join(sys.argv[1:])
    result["command"] = command
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, command))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
