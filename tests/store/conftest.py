"""The ledger fixtures (defined in tests/store/fixtures.py) for every test in this folder."""

from tests.store.fixtures import (
    backend,
    db_url,
    engine,
    pg_ledger_url,
    pg_schemas,
    session,
    session_factory,
    sqlite_template,
)

__all__ = [
    "backend",
    "db_url",
    "engine",
    "pg_ledger_url",
    "pg_schemas",
    "session",
    "session_factory",
    "sqlite_template",
]
