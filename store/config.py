"""Typed configuration section owned by `store/`: where the ledger and the artefacts live."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StoreConfig(BaseModel):
    """The edit ledger's database and the artefact store."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(
        None,
        description=(
            "SQLAlchemy database URL. Empty means SQLite at `<state_dir>/ledger.sqlite3`. "
            "Postgres: 'postgresql+psycopg://user@host:5432/dbname'."
        ),
    )
    sqlite_busy_timeout_ms: int = Field(
        30000, ge=0, le=600000, description="SQLite busy timeout: how long a writer waits for the lock."
    )
