"""`python -m ingest`: a real subprocess importing files and a loopback URL; exit codes and summaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.commands.ingest import main
from tests.conftest import REPO_ROOT
from tests.ingest.conftest import DATA, Route, WebServer


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingest", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def test_json_summary_for_files_and_a_url(tmp_path: Path, web: WebServer) -> None:
    web.routes["/facts.json"] = Route(json.dumps([{"prompt": "The owner of Globex is", "target_new": "Hank"}]).encode(),
                                      content_type="application/json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "target_new": ""}\n')
    result = run_cli("--state-dir", str(tmp_path / "state"), "--json", str(DATA / "native.jsonl"), str(bad),
                     web.url("/facts.json"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["accepted"], summary["duplicates"], summary["rejected"]) == (3, 0, 1)
    assert summary["errors"] == [{"origin": {"source": "cli", "location": str(bad), "position": "line 1"},
                                  "reason": "target_new: must not be empty or whitespace"}]
    # importing the same file again finds duplicates, in the human-readable form
    again = run_cli("--state-dir", str(tmp_path / "state"), str(DATA / "native.jsonl"))
    assert again.returncode == 0 and again.stdout == "accepted: 0\nduplicates: 2\nrejected: 0\n"


def test_unreadable_input_exits_1_and_is_listed(tmp_path: Path) -> None:
    result = run_cli("--state-dir", str(tmp_path), str(tmp_path / "missing.jsonl"), str(DATA / "native.jsonl"))
    assert result.returncode == 1
    assert "accepted: 2\n" in result.stdout
    assert f"{tmp_path / 'missing.jsonl'}: input: cannot read: No such file or directory" in result.stdout


def test_configuration_and_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_config = tmp_path / "config.toml"
    bad_config.write_text("[ingest]\ncommit_every = 0\n")
    assert main(["--config", str(bad_config), "--state-dir", str(tmp_path), "x.jsonl"]) == 2
    assert "ingest.commit_every" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2


def test_an_unreachable_ledger_exits_3_with_the_reason(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KED_")}
    env["KED_STORE__URL"] = "postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2"
    result = subprocess.run([sys.executable, "-m", "ingest", "--state-dir", str(tmp_path), str(DATA / "native.jsonl")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert (result.returncode, result.stdout) == (3, "")
    assert result.stderr.startswith("python -m ingest: cannot connect to the ledger")
