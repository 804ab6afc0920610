"""The edit ledger (SQLAlchemy 2 tables and queries) and the artefact store. Knows nothing of model maths.

Ledger map (docs/ledger.md): `records` plain input/output records; `normalise` text rules and
hashes; `models` tables and `FactStatus`; `states` the state machine (`transition`); `ledger` the
API (ingest writes, re-exporting the rest); `work` claim/recover/requeue; `commits` commits, probe
runs, reverts; `queries` read-only views; `db` engines, sessions, migrations; `bulk` fast inserts;
`errors` domain exceptions.
"""
