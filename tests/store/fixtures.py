"""Ledger fixtures: every test using `db_url`, `engine` or `session` runs on SQLite and on Postgres.

Imported by tests/store/conftest.py and by the ledger CLI tests.

Postgres comes from KED_TEST_POSTGRES_URL (default: the local server). Each test session works in
its own throwaway schema (dropped at the end), so engineers sharing the server do not collide; an
unreachable server FAILS the Postgres tests rather than skipping them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from store.db import make_engine, make_session_factory, upgrade_to_head
from store.models import Base

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_url() -> str:
    return os.environ.get("KED_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


class PostgresSchemas:
    """Creates uniquely named schemas on the test server and drops them all at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.admin = create_engine(url, isolation_level="AUTOCOMMIT")
        self.created: list[str] = []
        reason = self._unreachable()
        if reason:
            self.admin.dispose()
            pytest.fail(
                f"PostgreSQL is unreachable at {make_url(url).render_as_string(hide_password=True)} "
                f"({reason}); start the server or set KED_TEST_POSTGRES_URL "
                "(the ledger suite must run on Postgres, so this fails, not skips)",
                pytrace=False,
            )

    def _unreachable(self) -> str | None:
        try:
            with self.admin.connect() as connection:
                connection.execute(text("SELECT 1"))
        except OperationalError as exc:
            return str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        return None

    def new(self) -> str:
        """A URL whose connections work only inside a fresh, empty schema."""
        name = f"ked_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{name}"'))
        self.created.append(name)
        url = make_url(self.url)
        return url.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)

    def close(self) -> None:
        with self.admin.connect() as connection:
            for name in self.created:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def pg_schemas() -> Iterator[PostgresSchemas]:
    schemas = PostgresSchemas(postgres_url())
    yield schemas
    schemas.close()


@pytest.fixture(scope="session")
def pg_ledger_url(pg_schemas: PostgresSchemas) -> str:
    """One upgraded Postgres schema shared by the suite; tests empty it before use."""
    url = pg_schemas.new()
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    return url


BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An upgraded SQLite ledger, copied for each test (running the migrations each time is slower)."""
    path = tmp_path_factory.mktemp("template") / "ledger.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_to_head(engine)
    engine.dispose()  # the last connection to close checkpoints the WAL into the file and removes it
    assert not path.with_name(path.name + "-wal").exists()
    return path


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty, upgraded ledger on `backend`."""
    if backend == "sqlite":
        path = tmp_path / "ledger.sqlite3"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = str(request.getfixturevalue("pg_ledger_url"))
    engine = create_engine(url)
    # DELETE is much cheaper than TRUNCATE on tables this small.
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
            if "id" in table.c:  # ids start at 1 again, as on a fresh SQLite file
                connection.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), 1, false)"))
    engine.dispose()
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url, sqlite_busy_timeout_ms=10000)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> Callable[[], Session]:
    return make_session_factory(engine)


@pytest.fixture
def session(session_factory: Callable[[], Session]) -> Iterator[Session]:
    with session_factory() as session:
        yield session
        session.rollback()
