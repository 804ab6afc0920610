"""The Alembic revisions agree with the models and round-trip, on SQLite and on Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError

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


def test_failure_causes_are_read_from_the_errors_of_existing_facts(empty_engine: Engine) -> None:
    upgrade_to_head(empty_engine)
    downgrade_to(empty_engine, "0002")
    now = datetime.now(UTC)
    errors = {
        1: ("failed", "the edit raised RuntimeError: CUDA out of memory"),
        2: ("failed", "efficacy 0.250 < min_efficacy 0.9; out of retries after 3 tries"),
        3: ("failed", "passes with part of the batch but not together with facts 4: KL 1.2 > 1.0; out of retries"),
        4: ("rejected", "harms specificity on its own: agreement 0.4 < 0.6"),
        5: ("pending", "efficacy 0.500 < min_efficacy 0.9"),
        6: ("pending", "the daemon stopped while this fact's batch was being edited"),
        7: ("committed", None),
    }
    sources = sa.table("sources", *(sa.column(c) for c in ("id", "name", "kind", "location", "consecutive_failures", "created_at")))
    names = ("id", "prompt", "target_new", "rephrase_prompts", "locality", "content_hash", "prompt_hash", "status")
    more = ("attempts", "last_error", "source_id", "origin_location", "received_at", "status_changed_at")
    facts = sa.table("facts", *(sa.column(c) for c in (*names, *more)))
    with empty_engine.begin() as connection:
        connection.execute(sa.insert(sources).values(id=1, name="inbox", kind="dropfolder", location="inbox",
                                                  consecutive_failures=0, created_at=now))
        for fid, (status, error) in errors.items():
            connection.execute(sa.insert(facts).values(
                id=fid, prompt=f"p{fid}", target_new="t", rephrase_prompts="[]", locality="[]", content_hash=f"{fid:064}",
                prompt_hash=f"{fid:064}", status=status, attempts=1, last_error=error, source_id=1, origin_location="f",
                received_at=now, status_changed_at=now,
            ))
    upgrade_to_head(empty_engine)
    with empty_engine.connect() as connection:
        causes = dict(connection.execute(text("SELECT id, failure_cause FROM facts")).all())
    assert causes == {1: "error", 2: "efficacy", 3: "specificity", 4: "specificity", 5: "efficacy", 6: None, 7: None}
    with pytest.raises(IntegrityError), empty_engine.begin() as connection:  # the column takes the three causes only
        connection.execute(text("UPDATE facts SET failure_cause = 'gremlins' WHERE id = 1"))


def test_0004_adds_held_facts_and_its_downgrade_puts_them_back_to_pending(empty_engine: Engine) -> None:
    upgrade_to_head(empty_engine)
    now = datetime.now(UTC)
    with empty_engine.begin() as connection:
        connection.execute(
            text("INSERT INTO sources (id, name, kind, location, consecutive_failures, created_at) VALUES (1, 's', 'k', 'l', 0, :t)"),
            {"t": now},
        )
        connection.execute(
            text(
                "INSERT INTO facts (id, prompt, target_new, rephrase_prompts, locality, content_hash, prompt_hash, status, "
                "attempts, source_id, origin_location, received_at, status_changed_at, hold_reason) "
                "VALUES (1, 'p', 't', '[]', '[]', 'c', 'h', 'held', 0, 1, 'l', :t, :t, 'review')"
            ),
            {"t": now},
        )
        connection.execute(
            text("INSERT INTO reviews (fact_id, action, reviewer, decided_at) VALUES (1, 'approved', 'r', :t)"), {"t": now}
        )
    downgrade_to(empty_engine, "0003")
    with empty_engine.connect() as connection:
        assert connection.execute(text("SELECT status FROM facts")).scalar_one() == "pending"
    assert "reviews" not in _ledger_tables(empty_engine)
    with pytest.raises(IntegrityError), empty_engine.begin() as connection:
        connection.execute(text("UPDATE facts SET status = 'held'"))
    upgrade_to_head(empty_engine)
    assert _differences(empty_engine) == []
