"""Start-up shared by every entry point: settings, logging, the ledger, the model, its state and the editor.

A command-line tool is argument parsing plus calls into this module, in this order as far as it needs:

1. `command_parser` gives a command its `--config` / `--state-dir` options; `command_settings` builds
   the settings they name (precedence: daemon.config) and configures logging from their `[logging]`
   section. An unusable configuration is reported on stderr and gives None; the caller exits 2.
   `start_logging` alone is for a tool without settings (`python -m editing.evaluate`).
2. `open_ledger`: an engine with every `[store]` option, the schema migrated to head. With
   `create=False` a missing ledger raises LedgerMissing naming where it was looked for, and nothing is
   created: tools that inspect or steer an existing ledger never make an empty one.
3. `load_model`: the configured model, loaded as the daemon loads it (GGUF cache in the state directory).
4. `open_model_state`: the versioned weights of the state directory, recovered to the ledger's version.
5. `load_editor` / `save_editor`: the trained editor bound to the live model; a checkpoint written
   atomically (into `<dir>.partial`, then renamed), so a crash never leaves half an editor behind.

Nothing runs at import time. The model modules import torch (seconds), so the functions that need
them import them; a tool that only reads the ledger starts quickly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING

from sqlalchemy import make_url
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import ConfigError, LoggingConfig, Settings, add_common_arguments, settings_from_args
from daemon.logs import configure_logging
from store.db import current_revision, make_engine, safe_url, upgrade_to_head
from store.errors import LedgerError

if TYPE_CHECKING:
    from editing.engine.checkpoint import CheckpointInfo
    from editing.engine.emsedit import EMSEditor
    from editing.model.loading import LoadedModel
    from editing.state.history import ModelHistory


class LedgerMissing(LedgerError):
    """No ledger where the settings point, and the caller asked not to create one."""


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of a command that reads the settings, with `--config` and `--state-dir`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_common_arguments(parser)
    return parser


def command_settings(args: argparse.Namespace, *, prog: str, log_stream: IO[str] | None = None) -> Settings | None:
    """The settings of `--config` / `--state-dir`, with logging configured to `log_stream` (default stdout).

    None when the configuration cannot be used; the reason, naming each bad key, is written to stderr
    after `prog`.
    """
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    start_logging(settings.logging, stream=log_stream)
    return settings


def start_logging(config: LoggingConfig | None = None, *, stream: IO[str] | None = None) -> None:
    """Configure logging once for the process: `config` (default: the `[logging]` defaults) to `stream`."""
    configure_logging(config or LoggingConfig(), stream=stream)


def open_ledger(settings: Settings, *, create: bool = True) -> Engine:
    """An engine on the configured ledger with every `[store]` option, its schema migrated to head.

    With `create=False`, raises LedgerMissing when there is no ledger there (a SQLite file that does not
    exist, or a database without the ledger's schema); nothing is created. Raises LedgerUnavailable
    when the database cannot be reached.
    """
    url = settings.ledger_url()
    if not create:
        _check_sqlite_file(url, settings)
    engine = make_engine(
        url,
        sqlite_busy_timeout_ms=settings.store.sqlite_busy_timeout_ms,
        sqlite_cache_mb=settings.store.sqlite_cache_mb,
    )
    try:
        if not create and current_revision(engine) is None:
            raise LedgerMissing(
                f"the database {safe_url(url)} holds no ledger (no schema); check store.url (KED_STORE__URL)"
            )
        upgrade_to_head(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _check_sqlite_file(url: str, settings: Settings) -> None:
    # Checked before the engine exists: connecting to SQLite creates the file (and make_engine its folder).
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database or "")
    if not path.is_file():
        raise LedgerMissing(
            f"no ledger at {path} (state directory {settings.state_dir.resolve()}); pass the daemon's "
            "--state-dir or --config (or set KED_STATE_DIR / KED_STORE__URL)"
        )


def load_model(settings: Settings) -> LoadedModel:
    """The configured model (`[model]`), loaded as the daemon loads it; raises ModelLoadError."""
    from editing.model.loading import load_model as load

    return load(settings.model, cache_dir=settings.model_cache_dir())


def open_model_state(settings: Settings, loaded: LoadedModel, sessions: sessionmaker[Session]) -> ModelHistory:
    """The model state of `settings.state_dir` on the freshly loaded model, recovered to the ledger's version.

    See `daemon.model_state.open_history` for what recovery does and the errors it raises.
    """
    from daemon.model_state import open_history

    history, _ = open_history(settings, loaded, sessions)
    return history


def load_editor(settings: Settings, loaded: LoadedModel, module_names: list[str]) -> EMSEditor:
    """The editor of the configured checkpoint, bound to the live model. Raises ModelMismatch/CheckpointError."""
    from editing.engine.checkpoint import build_editor, load_checkpoint

    checkpoint = load_checkpoint(settings.editor_checkpoint())
    return build_editor(
        loaded.model, loaded.tokenizer, loaded.fingerprint, checkpoint, settings.editor, module_names,
        earlier_fingerprints=loaded.earlier_fingerprints,
    )


def save_editor(directory: Path, editor: EMSEditor, info: CheckpointInfo) -> Path:
    """Write an editor checkpoint to `directory`, replacing what is there; returns `directory`.

    The files are written into `<directory>.partial` and renamed into place, so a crash never leaves a
    half-written checkpoint under the final name (a leftover `.partial` is removed by the next save).
    """
    from editing.engine.checkpoint import save_checkpoint

    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_checkpoint(partial, editor, info)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(partial, directory)
    return directory
