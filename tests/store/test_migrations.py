"""The Alembic revisions agree with the models and round-trip, on SQLite and on Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from store.db import alembic_config, current_revision, downgrade_to, make_engine, upgrade_to_head
from store.models import Base
from tests.store.fixtures import PostgresSchemas


@pytest.fixture
def empty_engine(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An engine on an empty database (fresh SQLite file, or a fresh Postgres schema)."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    else:
        schemas: PostgresSchemas = request.getfixturevalue("pg_schemas")
        url = schemas.new()
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _differences(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def _ledger_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_autogenerate_finds_no_difference_after_upgrade(empty_engine: Engine) -> None:
    assert current_revision(empty_engine) is None
    upgrade_to_head(empty_engine)
    assert _differences(empty_engine) == []
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert current_revision(empty_engine) == head


def test_upgrade_is_idempotent(empty_engine: Engine) -> None:
    upgrade_to_head(empty_engine)
    upgrade_to_head(empty_engine)
    assert _ledger_tables(empty_engine) == set(Base.metadata.tables)


def test_every_revision_downgrades_and_upgrades_again(empty_engine: Engine) -> None:
    script = ScriptDirectory.from_config(alembic_config())
    revisions = [rev.revision for rev in reversed(list(script.walk_revisions()))]
    upgrade_to_head(empty_engine)
    for revision in reversed(revisions):  # step down one revision at a time
        down = script.get_revision(revision).down_revision
        downgrade_to(empty_engine, str(down) if down else "base")
        assert current_revision(empty_engine) == down
    assert _ledger_tables(empty_engine) == set()
    upgrade_to_head(empty_engine)
    assert _differences(empty_engine) == []


def test_constraints_follow_the_naming_convention(empty_engine: Engine) -> None:
    upgrade_to_head(empty_engine)
    inspector = inspect(empty_engine)
    for table in Base.metadata.tables:
        for fk in inspector.get_foreign_keys(table):
            assert fk["name"] and fk["name"].startswith(f"fk_{table}_"), (table, fk)
        for index in inspector.get_indexes(table):
            assert str(index["name"]).startswith(("ix_", "uq_")), (table, index)
        for unique in inspector.get_unique_constraints(table):
            assert str(unique["name"]).startswith(f"uq_{table}_"), (table, unique)
