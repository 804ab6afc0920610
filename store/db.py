"""Engines, sessions and schema upgrades for the ledger. Nothing is created at import time.

SQLite (the default, a file in the state directory) runs in WAL mode with a busy timeout, foreign
keys on, and every transaction started with ``BEGIN IMMEDIATE``: a writer takes the write lock when
its transaction starts, so two processes never deadlock on a read-to-write upgrade; they wait up to
the busy timeout instead. Sessions from `make_read_session_factory` begin deferred and never wait. Postgres is used as is (READ COMMITTED); the ledger functions take row or
advisory locks where they need them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from store.errors import LedgerUnavailable

#: Execution option that marks a connection as a reader (see make_read_session_factory).
READ_ONLY_OPTION = "ledger_read_only"
#: WAL pages (4 KiB each) after which a commit checkpoints the WAL into the database (SQLite's default: 1000).
SQLITE_WAL_AUTOCHECKPOINT_PAGES = 10_000
# Arbitrary constant shared by every process that migrates or adds facts on one Postgres database.
PG_LEDGER_LOCK_KEY = 0x6B65645F6C656467  # "ked_ledg"


def make_engine(url: str, *, sqlite_busy_timeout_ms: int = 30000, sqlite_cache_mb: int = 64) -> Engine:
    """An engine for `url`; for SQLite with WAL, `sqlite_busy_timeout_ms`, a page cache of
    `sqlite_cache_mb` per connection, and immediate transactions.

    Raises LedgerUnavailable for a URL SQLAlchemy cannot parse or whose driver is missing.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise LedgerUnavailable(f"ledger URL {url!r} is not a valid SQLAlchemy URL: {exc}") from None
    if parsed.get_backend_name() != "sqlite":
        try:
            return create_engine(parsed, pool_pre_ping=True)
        except (ArgumentError, ImportError) as exc:
            raise LedgerUnavailable(f"cannot use ledger URL {safe_url(url)}: {exc}") from None
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args={"timeout": sqlite_busy_timeout_ms / 1000})
    _configure_sqlite(engine, sqlite_busy_timeout_ms, sqlite_cache_mb)
    return engine


def _configure_sqlite(engine: Engine, busy_timeout_ms: int, cache_mb: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that the "begin" hook decides.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # The default 2 MB cache thrashes on the hash indexes once the ledger holds ~50,000 facts.
        cursor.execute(f"PRAGMA cache_size=-{int(cache_mb) * 1024}")
        # NORMAL is durable across application crashes in WAL mode; only an OS crash can lose the
        # last transactions (https://www.sqlite.org/pragma.html#pragma_synchronous).
        cursor.execute("PRAGMA synchronous=NORMAL")
        # Checkpoint (copy the WAL into the database file, with its two fsyncs) every ~40 MB of WAL
        # rather than SQLite's default ~4 MB. Durability is unchanged: a committed transaction is in
        # the WAL either way. An ingest commit rewrites most pages of the random prompt-hash index,
        # so a rare checkpoint copies each such page once for several commits (bench/ledger.py).
        cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_AUTOCHECKPOINT_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Readers (make_read_session_factory) start deferred: in WAL mode they never wait for a writer.
        read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


def serialise_writers(session: Session) -> None:
    """Make this transaction the only ledger writer of its kind until it ends.

    SQLite needs nothing: its immediate transactions already hold the database's write lock. On
    Postgres this takes a transaction-level advisory lock, released at commit or rollback.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LEDGER_LOCK_KEY})


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine`; objects stay readable after commit (no reload on attribute access)."""
    return sessionmaker(engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for reading only (status pages, the API's GETs, the CLI's queries).

    On SQLite their transactions begin deferred, so they read a consistent snapshot without waiting
    for a writer (WAL mode), and a writer never waits for them; a write through such a session may
    fail with "database is locked". On Postgres they are ordinary sessions.
    """
    return sessionmaker(engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic configuration, built in code: scripts in `migrations/`, run over `connection`."""
    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["connection"] = connection
    return config


def upgrade_to_head(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it is there already).

    Safe when several processes start at once: SQLite serialises them with its write lock,
    Postgres with a transaction-level advisory lock. Raises LedgerUnavailable when the database
    cannot be reached.
    """
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if current_revision(engine) == head:
        return  # checked as a reader: a ledger already at head is opened without the write lock
    _run_migration(engine, "upgrade", "head")


def downgrade_to(engine: Engine, revision: str) -> None:
    """Step the schema down to `revision` ("base" drops every ledger table)."""
    _run_migration(engine, "downgrade", revision)


def current_revision(engine: Engine) -> str | None:
    """The schema revision stamped in the database, or None for an empty database."""
    with _connect(engine.execution_options(**{READ_ONLY_OPTION: True})) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _run_migration(engine: Engine, direction: str, revision: str) -> None:
    with _connect(engine) as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LEDGER_LOCK_KEY})
        config = alembic_config(connection)
        if direction == "upgrade":
            command.upgrade(config, revision)
        else:
            command.downgrade(config, revision)


def _connect(engine: Engine) -> Connection:
    try:
        return engine.connect()
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise LedgerUnavailable(
            f"cannot connect to the ledger at {safe_url(engine.url)}: {reason}; check `store.url` "
            "(KED_STORE__URL) and that the database server is running"
        ) from None


def safe_url(url: str | URL) -> str:
    """A database URL with its password hidden, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)
