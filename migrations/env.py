"""Alembic environment: run by `store.db` with a connection in `config.attributes["connection"]`.

There is no alembic.ini: `store.db.alembic_config` builds the configuration in code, so the URL
always comes from our settings. Batch mode is on so that revisions can alter SQLite tables, and
column types are compared so that autogenerate notices type changes.
"""

from __future__ import annotations

from alembic import context

from store.models import Base


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "migrations/env.py needs a connection: run migrations through store.db.upgrade_to_head(engine)"
        )
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; use store.db.upgrade_to_head(engine)")
run_migrations_online()
