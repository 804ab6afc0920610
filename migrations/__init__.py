"""Alembic environment and revisions of the edit ledger."""
