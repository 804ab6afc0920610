"""Fact ingestion: sources (drop folder, JSONL, RSS/Atom, web JSON) parsed and validated into the ledger.

Map of the package (docs/ingest.md describes the behaviour):

- `config`: the `[ingest]` settings: sources, limits, HTTP client.
- `documents`: bytes to raw JSON records (JSONL, JSON documents, gzip) under the byte limits.
- `shapes`: recognises our fact format and the ZsRE / CounterFact / ROME benchmark shapes.
- `facts`: validation of one record into a `store.records.FactIn`, or a precise rejection.
- `recording`: writes facts and rejections through `store.intake` (the caller's transaction).
- `progress`, `polling`: source cursors, and committing a poll with its cursor as one unit.
- `fetch`: the HTTP client (timeouts, conditional GET, size limit, same-host redirects).
- `dropfolder`, `jsonl`, `rss`, `web`: the four source kinds.
- `scheduling`: `schedule_sources` (APScheduler jobs), back-off and `source_health`.
- `inputs`: files and URLs imported once (`python -m ingest FILE_OR_URL...`; the command itself,
  which needs the settings, is `daemon.commands.ingest`, run by `__main__`).

Importing this package does no work; the daemon imports `ingest.scheduling` when it starts.
"""
