"""Ingestion throughput, end to end into a SQLite ledger: the drop folder and one RSS feed.

1. Drop folder: one JSONL file of `--records` facts (CounterFact training records, each given a
   variant number so every fact is distinct) is scanned by `ingest.dropfolder.DropFolder`: read,
   parsed, validated, stored in transactions of `commit_every` records with the cursor, reported
   and moved to processed/. Also timed separately: parsing and validation alone (no ledger).
2. Feed: an RSS 2.0 feed of `--feed-entries` items (a JSON fact in each description) served by a
   loopback HTTP server and polled once by `ingest.rss.poll` (fetch, feedparser, mapping, ledger).

Reported: facts per second, and seconds to first fact (from the start until the first facts are
committed, i.e. visible to the edit loop).

    .venv/bin/python -m bench.ingest                       # 100,000 facts, 1,000 feed entries
    .venv/bin/python -m bench.ingest --records 20000

Run it with -m from the repository root: as `python bench/ingest.py` this file's folder would come
first on sys.path and the file itself would shadow the `ingest` package.

Writes bench/results/ingest.json and bench/results/ingest.md.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import feedparser
import sqlalchemy

from daemon.config import ConfigError, add_common_arguments, settings_from_args
from daemon.logs import configure_logging
from ingest import rss
from ingest.config import FeedSource, IngestConfig
from ingest.documents import read_document
from ingest.dropfolder import DropFolder
from ingest.facts import to_outcomes
from store.db import make_engine, make_session_factory, upgrade_to_head

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact_train.json"


@dataclass(frozen=True)
class Run:
    scenario: str
    records: int
    accepted: int
    seconds: float
    cpu_seconds: float  #: CPU time of this process (steadier than wall time on a shared machine)
    facts_per_second: float
    facts_per_cpu_second: float
    seconds_to_first_fact: float


def variants(data: Path, count: int) -> Iterator[dict[str, Any]]:
    """`count` distinct CounterFact records: the base set repeated with a variant number in the prompt."""
    base = json.loads(data.read_text(encoding="utf-8"))
    for i in range(count):
        record = dict(base[i % len(base)])
        record["prompt"] = f"{record['prompt']} (variant {i // len(base)})" if i >= len(base) else record["prompt"]
        record["case_id"] = i
        yield record


def bench_drop_folder(root: Path, data: Path, records: int, config: IngestConfig) -> tuple[Run, float, float]:
    """Time one drop-folder scan of a `records`-line file; also returns the parse-only wall and CPU seconds."""
    inbox = root / "inbox"
    inbox.mkdir()
    path = inbox / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in variants(data, records)), encoding="utf-8")
    os.utime(path, (time.time() - 60, time.time() - 60))
    started, cpu = time.perf_counter(), time.process_time()
    parsed = to_outcomes(read_document(path.read_bytes(), name=path.name, limits=config.limits), source="bench",
                         location=str(path), limits=config.limits)
    parse_seconds, parse_cpu = time.perf_counter() - started, time.process_time() - cpu
    assert len(parsed) == records

    engine = make_engine(f"sqlite:///{root}/drop.sqlite3")
    upgrade_to_head(engine)
    first: list[float] = []

    def on_step(step: str) -> None:
        if step == "committed" and not first:
            first.append(time.perf_counter())

    folder = DropFolder(inbox, config, make_session_factory(engine), on_step=on_step)
    started, cpu = time.perf_counter(), time.process_time()
    [result] = folder.scan()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    engine.dispose()
    accepted = result.tally.accepted
    return Run("drop folder, one JSONL file", records, accepted, seconds, cpu_seconds, accepted / seconds,
               accepted / cpu_seconds, first[0] - started), parse_seconds, parse_cpu


def feed_bytes(data: Path, entries: int) -> bytes:
    """An RSS 2.0 document with one JSON fact per item description."""
    items = []
    for i, record in enumerate(variants(data, entries)):
        fact = {"prompt": f"{record['prompt']} [feed {i}]", "target_new": record["target_new"]}
        items.append(
            f"<item><title>fact {i}</title><guid isPermaLink=\"false\">bench-{i}</guid>"
            f"<pubDate>Sat, 21 Nov 2026 10:00:00 GMT</pubDate>"
            f"<description>{html.escape(json.dumps(fact))}</description></item>"
        )
    body = "".join(items)
    return (f'<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>bench</title>'
            f"<link>http://127.0.0.1/</link><description>bench</description>{body}</channel></rss>").encode()


@contextmanager
def serve(body: bytes) -> Iterator[str]:
    """Serve `body` at /feed.xml on a loopback port for the duration of the block."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/rss+xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            del format, args

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/feed.xml"
    finally:
        server.shutdown()
        server.server_close()


def bench_feed(root: Path, data: Path, entries: int, config: IngestConfig) -> Run:
    """Time one poll of a feed of `entries` items (the first facts are visible when the poll commits)."""
    engine = make_engine(f"sqlite:///{root}/feed.sqlite3")
    upgrade_to_head(engine)
    with serve(feed_bytes(data, entries)) as url:
        source = FeedSource.model_validate({"name": "bench", "url": url})
        started, cpu = time.perf_counter(), time.process_time()
        result = rss.poll(source, config, make_session_factory(engine))
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    engine.dispose()
    accepted = result.tally.accepted
    # One poll is one transaction: its facts all become visible when it commits.
    return Run("RSS feed, one poll", entries, accepted, seconds, cpu_seconds, accepted / seconds,
               accepted / cpu_seconds, seconds)


def write_results(runs: list[Run], parse: tuple[float, float], config: IngestConfig) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    environment = {
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "feedparser": feedparser.__version__,
        "commit_every": config.commit_every,
    }
    drop, (parse_seconds, parse_cpu) = runs[0], parse
    result = {
        "command": " ".join(["python -m bench.ingest", *sys.argv[1:]]),
        "runs": [asdict(r) for r in runs],
        "drop_folder_parse_only_seconds": round(parse_seconds, 3),
        "drop_folder_parse_only_cpu_seconds": round(parse_cpu, 3),
        "drop_folder_parse_only_facts_per_second": round(drop.records / parse_seconds, 1),
        "environment": environment,
    }
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    rows = "\n".join(
        f"| {r.scenario} | {r.records:,} | {r.accepted:,} | {r.seconds:.2f} | {r.cpu_seconds:.2f} | "
        f"{r.facts_per_second:,.0f} | {r.facts_per_cpu_second:,.0f} | {r.seconds_to_first_fact:.2f} |"
        for r in runs
    )
    (RESULTS / "ingest.md").write_text(
        "# Ingestion throughput\n\n"
        f"`{result['command']}`: end to end into a SQLite ledger (WAL), {config.commit_every} records per "
        "transaction.\n\n"
        "| scenario | records | facts stored | seconds | CPU seconds | facts/s | facts per CPU second "
        "| seconds to first fact |\n|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Parsing and validation alone (no ledger) of the drop-folder file: {parse_seconds:.2f} s, "
        f"{parse_cpu:.2f} CPU s; compare with the drop folder's CPU seconds: the difference is the ledger's "
        "`add_facts` (dedup, supersession, provenance), the commits and the cursor.\n\n"
        f"Machine: {environment['cpus']} CPUs, load average at the end {environment['load_average_at_end']} "
        f"(other work shares the machine), Python {environment['python']}, SQLAlchemy {environment['sqlalchemy']}, "
        f"feedparser {environment['feedparser']}.\n",
        encoding="utf-8",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--records", type=int, default=100_000, help="facts in the drop-folder file")
    parser.add_argument("--feed-entries", type=int, default=1000, help="entries in the feed")
    parser.add_argument("--data", type=Path, default=DATA, help="CounterFact file (EasyEdit flat form)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"python -m bench.ingest: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.logging, stream=sys.stderr)
    config = settings.ingest.model_copy(update={"settle_seconds": 0.0})
    with tempfile.TemporaryDirectory(prefix="ked-bench-ingest-") as tmp:
        root = Path(tmp)
        drop, parse_seconds, parse_cpu = bench_drop_folder(root, args.data, args.records, config)
        feed = bench_feed(root, args.data, args.feed_entries, config)
    write_results([drop, feed], (parse_seconds, parse_cpu), config)
    sys.stdout.write((RESULTS / "ingest.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
