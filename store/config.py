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
    sqlite_cache_mb: int = Field(
        64,
        ge=2,
        le=4096,
        description="SQLite page cache per connection, in MiB; ingest slows down once the indexes outgrow it.",
    )
    snapshot_every: int = Field(
        25,
        ge=0,
        le=100000,
        description=(
            "Consolidate the cumulative edited weights into a snapshot after this many commits of the active "
            "chain (0: never). Start-up and reverts replay at most this many commits after a snapshot."
        ),
    )
    retention_commits: int | None = Field(
        200,
        ge=1,
        description=(
            "Retention horizon: keep at least the newest this many commits revertable and delete older "
            "artefacts (a revert beyond the horizon is refused). Empty keeps every artefact."
        ),
    )
