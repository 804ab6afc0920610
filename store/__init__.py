"""The edit ledger (SQLAlchemy 2 tables and queries) and the artefact store. Knows nothing of model maths."""
