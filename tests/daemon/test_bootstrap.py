"""The start-up every entry point shares (`daemon.bootstrap`), and the command names it serves.

The ledger is opened with every configured `[store]` option (`python -m ingest` once forgot the page
cache); tools that only inspect or steer a ledger never create one; an editor checkpoint is replaced
whole or not at all, by the daemon's first run and by `python -m editing.train` alike.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy.engine import Engine

from daemon import bootstrap
from daemon.bootstrap import LedgerMissing, open_ledger, save_editor
from daemon.commands import ingest as ingest_command
from daemon.commands import train as train_command
from daemon.config import load_settings, reference_markdown
from editing.engine import checkpoint
from store.db import make_engine
from tests.daemon.test_model_state import EDIT_MODULES, tiny_model_dir_fixture

__all__ = ["tiny_model_dir_fixture"]

REPO_ROOT = Path(__file__).resolve().parents[2]
START_LOGGING = bootstrap.start_logging  # the real one; the tests below keep commands from configuring logging


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No KED_* variables, no ./config.toml, and no process-wide logging set-up left behind by a command."""
    for name in [k for k in os.environ if k.startswith("KED_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bootstrap, "start_logging", lambda *args, **kwargs: None)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Put back the test runner's logging after a test that configures the process's."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_logging_to_standard_error_follows_the_stream_the_process_has_now(
    monkeypatch: pytest.MonkeyPatch, restored_logging: None
) -> None:
    """A command run in-process (by a test capturing its output) leaves no handler on a stream closed since."""
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    START_LOGGING(stream=sys.stderr)
    logging.getLogger("test").warning("before")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("test").warning("after")
    assert "after" in second.getvalue() and "before" not in second.getvalue()


def _cache_pages(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("PRAGMA cache_size").scalar_one())


def test_open_ledger_applies_the_store_options_and_creates_only_when_asked(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    with pytest.raises(LedgerMissing, match=f"no ledger at {tmp_path / 'state' / 'ledger.sqlite3'}"):
        open_ledger(settings, create=False)
    assert not (tmp_path / "state").exists()

    open_ledger(settings).dispose()
    config = tmp_path / "c.toml"
    config.write_text("[store]\nsqlite_cache_mb = 8\n")
    engine = open_ledger(load_settings(config, state_dir=tmp_path / "state"), create=False)
    try:
        assert _cache_pages(engine) == -8 * 1024  # negative: KiB, as make_engine sets it
    finally:
        engine.dispose()


def test_python_m_ingest_opens_the_ledger_with_the_configured_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[Engine, dict[str, Any]]] = []

    def spy(url: str, **options: Any) -> Engine:
        engine = make_engine(url, **options)
        opened.append((engine, options))
        return engine

    monkeypatch.setattr(bootstrap, "make_engine", spy)
    config = tmp_path / "c.toml"
    config.write_text("[store]\nsqlite_cache_mb = 8\nsqlite_busy_timeout_ms = 1234\n")
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "The CEO of Acme is", "target_new": "Jane Roe"}) + "\n")

    assert ingest_command.main(["--config", str(config), "--state-dir", str(tmp_path / "state"), str(facts)]) == 0

    ((engine, options),) = opened
    assert options == {"sqlite_busy_timeout_ms": 1234, "sqlite_cache_mb": 8}
    assert _cache_pages(engine) == -8 * 1024
    engine.dispose()


def _save_like_checkpoint(fail: bool) -> Any:
    """A stand-in for `save_checkpoint` that writes its two files (labelled by `info`), or dies after the first."""

    def save(directory: Path, editor: Any, info: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / checkpoint.WEIGHTS_FILE).write_text(f"weights {info}")
        if fail:
            raise OSError("No space left on device")
        (directory / checkpoint.CONFIG_FILE).write_text(f"config {info}")

    return save


def _contents(directory: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in directory.iterdir()}


def test_save_editor_replaces_a_checkpoint_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "editor"
    monkeypatch.setattr(checkpoint, "save_checkpoint", _save_like_checkpoint(fail=False))
    assert save_editor(target, None, "old") == target  # type: ignore[arg-type]
    old = _contents(target)
    assert old == {checkpoint.WEIGHTS_FILE: "weights old", checkpoint.CONFIG_FILE: "config old"}

    monkeypatch.setattr(checkpoint, "save_checkpoint", _save_like_checkpoint(fail=True))
    with pytest.raises(OSError, match="No space"):
        save_editor(target, None, "new")  # type: ignore[arg-type]
    assert _contents(target) == old  # the live checkpoint is untouched

    monkeypatch.setattr(checkpoint, "save_checkpoint", _save_like_checkpoint(fail=False))
    save_editor(target, None, "new")  # type: ignore[arg-type]
    assert _contents(target) == {checkpoint.WEIGHTS_FILE: "weights new", checkpoint.CONFIG_FILE: "config new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["editor"]  # the leftover .partial is gone


def test_python_m_editing_train_never_leaves_a_half_written_editor(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash while the checkpoint is written leaves the editor a running daemon would load as it was."""
    output = tmp_path / "editor"
    output.mkdir()
    for name in (checkpoint.WEIGHTS_FILE, checkpoint.CONFIG_FILE):
        (output / name).write_text("the editor in use")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[model]\nsource = "{tiny_model_dir}"\ndevice = "cpu"\nedit_modules = {json.dumps(EDIT_MODULES)}\n'
    )
    monkeypatch.setattr(checkpoint, "save_checkpoint", _save_like_checkpoint(fail=True))
    argv = ["--config", str(config), "--state-dir", str(tmp_path / "state"), "--output", str(output)]
    argv += ["--data", "synthetic:4", "--rank", "4", "--n-blocks", "1", "--batch-size", "4", "--n-batches", "1"]
    with pytest.raises(OSError, match="No space"):
        train_command.main([*argv, "--no-progress"])
    assert set(_contents(output).values()) == {"the editor in use"}


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KED_")} | {"PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("name", ["editing.train", "editing.evaluate", "ingest", "daemon.config"])
def test_the_command_names_users_know_still_run(name: str) -> None:
    result = _run(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {name} ")


def test_python_m_daemon_config_prints_the_settings_or_the_reference(tmp_path: Path) -> None:
    result = _run("daemon.config", "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state_dir"] == str(tmp_path / "s")
    assert not (tmp_path / "s").exists()
    result = _run("daemon.config", "--reference")
    assert (result.returncode, result.stdout) == (0, reference_markdown())
    bad = tmp_path / "bad.toml"
    bad.write_text("[editor]\nsteps = 0\n")
    result = _run("daemon.config", "--config", str(bad))
    assert result.returncode == 2 and result.stderr.startswith("python -m daemon.config: ")
    assert "editor.steps" in result.stderr
