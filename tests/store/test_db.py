"""Engine set-up: SQLite pragmas and immediate transactions; clear errors for bad or unreachable URLs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from store.db import (
    SQLITE_WAL_AUTOCHECKPOINT_PAGES,
    make_engine,
    make_read_session_factory,
    make_session_factory,
    upgrade_to_head,
)
from store.errors import LedgerUnavailable


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'l.sqlite3'}", sqlite_busy_timeout_ms=1234, sqlite_cache_mb=8)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 1234
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA cache_size")).scalar() == -8 * 1024
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
    engine.dispose()


def test_sqlite_checkpoints_the_wal_rarely_without_giving_up_durability(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA wal_autocheckpoint")).scalar() == SQLITE_WAL_AUTOCHECKPOINT_PAGES
        assert SQLITE_WAL_AUTOCHECKPOINT_PAGES == 10_000
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 1  # still NORMAL, not OFF
    engine.dispose()


def test_sqlite_transactions_take_the_write_lock_when_they_begin(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'l.sqlite3'}", sqlite_busy_timeout_ms=200)
    upgrade_to_head(engine)
    factory = make_session_factory(engine)
    with factory() as first, factory() as second:
        first.execute(text("SELECT 1"))  # a read, yet it begins IMMEDIATE and holds the write lock
        started = time.monotonic()
        with pytest.raises(OperationalError, match="database is locked"):
            second.execute(text("SELECT 1"))
        assert time.monotonic() - started >= 0.15  # it waited for the busy timeout first
        first.rollback()
        assert second.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()


def test_invalid_url_is_a_ledger_error() -> None:
    with pytest.raises(LedgerUnavailable, match="not a valid SQLAlchemy URL"):
        make_engine("not a url")
    with pytest.raises(LedgerUnavailable, match="cannot use ledger URL"):
        make_engine("nosuchdialect://x/y")


def test_unreachable_postgres_names_url_without_password() -> None:
    engine = make_engine("postgresql+psycopg://user:secret@127.0.0.1:1/db?connect_timeout=2")
    with pytest.raises(LedgerUnavailable, match=r"cannot connect to the ledger at .*127\.0\.0\.1:1/db") as info:
        upgrade_to_head(engine)
    assert "secret" not in str(info.value)
    engine.dispose()


def test_sqlite_readers_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'l.sqlite3'}", sqlite_busy_timeout_ms=5000)
    upgrade_to_head(engine)
    with make_session_factory(engine)() as writer, make_read_session_factory(engine)() as reader:
        writer.execute(
            text(
                "INSERT INTO reverts (requested_at, from_version, to_version, requested_by, "
                "reverted_commits, reverted_facts) VALUES ('2026-01-01', 1, 0, 'w', 0, 0)"
            )
        )
        started = time.monotonic()
        assert reader.execute(text("SELECT count(*) FROM reverts")).scalar() == 0  # the snapshot before
        assert time.monotonic() - started < 1.0
        writer.commit()
        reader.rollback()
        assert reader.execute(text("SELECT count(*) FROM reverts")).scalar() == 1
    engine.dispose()
