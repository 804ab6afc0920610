"""The edit ledger (SQLAlchemy 2 tables and queries) and the artefact store. Knows nothing of model maths.

Ledger map (docs/ledger.md): `records` plain input/output records; `normalise` text rules and
hashes; `models` tables, `FactStatus` and `FailureCause`; `states` the state machine (`transition`);
`intake` ingest's writes (facts with dedup and supersession, rejections, source poll state); `work`
claim/recover/requeue; `commits` commits, probe runs, reverts; `pauses` editing paused and resumed;
`queries` read-only views; `db` engines, sessions, migrations; `bulk` fast inserts; `errors` domain
exceptions; `config` the `[store]` settings.

Model state on disk: `artefacts` the per-commit artefacts and snapshots; `retention` which of them
are kept and how far back a version can be rebuilt; `lock` the model lock of a state directory.
"""
