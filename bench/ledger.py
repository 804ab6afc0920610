"""Ledger ingest throughput: 100,000 facts (10% duplicates) from one JSONL file into SQLite and Postgres.

The file is built from the CounterFact training set (10,000 records, repeated with a variant number
so every fact is distinct), then a fraction of the lines are repeated verbatim at random places.
The timed part reads the file, parses each line as ingest does (`read_batches`) into a `FactIn`,
and stores the records with `store.ledger.add_facts` (normalisation, hashing, dedup, supersession
checks and provenance), committing one transaction per batch. Throughput is input records per
second of wall time; the client CPU time per record is reported too, since the machine may be shared.

    .venv/bin/python -m bench.ledger                     # both back-ends, 100,000 records
    .venv/bin/python -m bench.ledger --repeat 3          # three runs per back-end: the fastest and the spread
    .venv/bin/python -m bench.ledger --records 20000 --skip-postgres

(Run it as a module from the repository root: `python bench/ledger.py` would put bench/ first on
the import path, where bench/ingest.py hides the `ingest` package.)

Writes bench/results/ledger.json and bench/results/ledger.md. Target: >= 20,000 facts/s on SQLite.
With `--repeat N` every back-end is measured N times, each run in a new process on a new, empty
ledger: the headline keys come from the fastest run (wall time), and every run is listed with the
spread, since wall time on a shared machine depends on the other work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import create_engine, func, make_url, select, text

from daemon.config import ConfigError, add_common_arguments, settings_from_args
from daemon.logs import configure_logging
from ingest.config import IngestLimits
from ingest.documents import parse_line
from ingest.facts import parse_timestamp
from store import intake
from store.db import SQLITE_WAL_AUTOCHECKPOINT_PAGES, make_engine, make_session_factory, upgrade_to_head
from store.models import Fact, FactOrigin
from store.records import FactIn, Locality, Origin

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact_train.json"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TARGET_SQLITE = 20_000


@dataclass(frozen=True)
class Run:
    backend: str
    records: int
    unique_facts: int
    duplicates: int
    seconds: float
    cpu_seconds: float  #: CPU time of this process (the machine may be shared; wall time includes waiting)
    facts_per_second: float  #: records / seconds: reading and parsing the file included
    store_seconds: float  #: the add_facts calls and commits alone
    store_facts_per_second: float
    cpu_us_per_record: float  #: client CPU per record, reading and parsing included
    store_cpu_us_per_record: float  #: client CPU per record in add_facts and commit (SQLite's own work included)
    load_average_before: float  #: 1-minute load average when the run started
    load_average_after: float  #: 1-minute load average when the run ended


def write_input(path: Path, data: Path, records: int, duplicate_ratio: float, seed: int) -> int:
    """Write `records` JSONL lines, `duplicate_ratio` of them repeats of earlier lines; returns unique count."""
    base = json.loads(data.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    unique = records - int(records * duplicate_ratio)
    lines = [_record(base[i % len(base)], i // len(base), i) for i in range(unique)]
    for _ in range(records - unique):
        position = rng.randrange(1, len(lines) + 1)
        lines.insert(position, lines[rng.randrange(0, position)])  # a repeat always follows its original
    path.write_text("".join(lines), encoding="utf-8")
    return unique


def _record(row: dict[str, Any], variant: int, index: int) -> str:
    suffix = f" (variant {variant})" if variant else ""
    record = {
        "prompt": row["prompt"] + suffix,
        "target_new": row["target_new"],
        "subject": row["subject"],
        "ground_truth": row["ground_truth"],
        "rephrase_prompts": [row["rephrase_prompt"] + suffix],
        "locality": [{"prompt": row["locality_prompt"], "answer": row["locality_ground_truth"]}],
        "id": f"cf-{index}",
        "observed_at": "2026-11-21T10:00:00Z",
    }
    return json.dumps(record, ensure_ascii=False) + "\n"


def read_batches(path: Path, batch_size: int) -> Iterator[list[tuple[FactIn, Origin]]]:
    """The records of `path` as add_facts takes them, `batch_size` at a time.

    Each line is parsed as the real ingest path parses it (`ingest.documents.parse_line`: the
    same JSON decoder, duplicate-key and depth checks) and `observed_at` is read with ingest's
    `parse_timestamp`. Ingest's validation (pydantic, text cleaning, lengths) is left out: the
    input is known to be valid, and `python -m bench.ingest` measures it.
    """
    limits = IngestLimits()
    batch: list[tuple[FactIn, Origin]] = []
    location = str(path)
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            raw = parse_line(line.rstrip(b"\r\n"), limits)
            observed = raw.get("observed_at")
            fact = FactIn(
                prompt=raw["prompt"],
                target_new=raw["target_new"],
                subject=raw.get("subject"),
                ground_truth=raw.get("ground_truth"),
                rephrase_prompts=tuple(raw.get("rephrase_prompts", ())),
                locality=tuple([Locality(item["prompt"], item["answer"]) for item in raw.get("locality", ())]),
                external_id=raw.get("id"),
                observed_at=None if observed is None else parse_timestamp("observed_at", observed),
            )
            batch.append((fact, Origin("bench", location, f"line {number}")))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def run_backend(backend: str, url: str, path: Path, records: int, batch_size: int) -> Run:
    engine = make_engine(url)
    upgrade_to_head(engine)
    factory = make_session_factory(engine)
    duplicates, store_seconds, store_cpu = 0, 0.0, 0.0
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in read_batches(path, batch_size):
        store_started, store_cpu_started = time.perf_counter(), time.process_time()
        with factory() as session, session.begin():
            duplicates += intake.add_facts(session=session, items=batch).duplicates
        store_seconds += time.perf_counter() - store_started
        store_cpu += time.process_time() - store_cpu_started
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    with factory() as session:
        unique = session.scalar(select(func.count()).select_from(Fact)) or 0
        origins = session.scalar(select(func.count()).select_from(FactOrigin)) or 0
    engine.dispose()
    load_after = os.getloadavg()[0]
    if origins != records or unique + duplicates != records:
        raise RuntimeError(f"{backend}: stored {unique} facts and {origins} origins for {records} records")
    return Run(
        backend=backend,
        records=records,
        unique_facts=unique,
        duplicates=duplicates,
        seconds=round(seconds, 3),
        cpu_seconds=round(cpu_seconds, 3),
        facts_per_second=round(records / seconds, 1),
        store_seconds=round(store_seconds, 3),
        store_facts_per_second=round(records / store_seconds, 1),
        cpu_us_per_record=round(cpu_seconds / records * 1e6, 1),
        store_cpu_us_per_record=round(store_cpu / records * 1e6, 1),
        load_average_before=round(load_before, 2),
        load_average_after=round(load_after, 2),
    )


def postgres_schema_url(admin_url: str) -> tuple[str, str]:
    name = f"ked_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{name}"'))
    admin.dispose()
    url = make_url(admin_url).update_query_dict({"options": f"-csearch_path={name}"})
    return url.render_as_string(hide_password=False), name


def drop_schema(admin_url: str, name: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    admin.dispose()


def _keys(run: Run) -> dict[str, float]:
    """The headline keys of one run in ledger.json, prefixed with its back-end."""
    return {
        f"{run.backend}_facts_per_second": run.facts_per_second,
        f"{run.backend}_store_only_facts_per_second": run.store_facts_per_second,
        f"{run.backend}_cpu_us_per_record": run.cpu_us_per_record,
        f"{run.backend}_store_cpu_us_per_record": run.store_cpu_us_per_record,
    }


def best_runs(runs: list[Run]) -> dict[str, Run]:
    """The fastest run (wall time) of each back-end, in the order the back-ends were measured."""
    best: dict[str, Run] = {}
    for run in runs:
        if run.backend not in best or run.facts_per_second > best[run.backend].facts_per_second:
            best[run.backend] = run
    return best


def _spread(values: list[float]) -> list[float]:
    """[lowest, median, highest]."""
    return [min(values), round(statistics.median(values), 1), max(values)]


def write_results(runs: list[Run], args: argparse.Namespace, unique: int) -> None:
    result: dict[str, Any] = {"sqlite_facts_per_second": None, "postgres_facts_per_second": None}
    for backend, run in best_runs(runs).items():
        result.update(_keys(run))
        mine = [r for r in runs if r.backend == backend]
        result[f"{backend}_runs"] = len(mine)
        result[f"{backend}_facts_per_second_spread"] = _spread([r.facts_per_second for r in mine])
        result[f"{backend}_cpu_us_per_record_spread"] = _spread([r.cpu_us_per_record for r in mine])
    result.update(
        {
            "target_sqlite_facts_per_second": TARGET_SQLITE,
            "records": args.records,
            "distinct_input_records": unique,
            "duplicate_ratio": args.duplicate_ratio,
            "batch_size": args.batch_size,
            "sqlite_settings": _sqlite_settings(),
            "runs": [asdict(run) for run in runs],
            "machine": {
                "cpus": os.cpu_count(),
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
                "sqlalchemy": sqlalchemy.__version__,
                "sqlite": __import__("sqlite3").sqlite_version,
            },
            "command": " ".join(["python -m bench.ledger", *args.argv]),
        }
    )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "ledger.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.results_dir / "ledger.md").write_text(_markdown(runs, args, unique, result), encoding="utf-8")


def _sqlite_settings() -> str:
    return (
        "journal_mode=WAL, synchronous=NORMAL, foreign_keys=ON, "
        f"wal_autocheckpoint={SQLITE_WAL_AUTOCHECKPOINT_PAGES}, cache_size 64 MB (store/db.py)"
    )


def _markdown(runs: list[Run], args: argparse.Namespace, unique: int, result: dict[str, Any]) -> str:
    best = best_runs(runs)
    rows = "\n".join(
        f"| {r.backend}{' (headline)' if len(runs) > len(best) and best[r.backend] is r else ''} | "
        f"{r.records:,} | {r.unique_facts:,} | {r.duplicates:,} | {r.seconds:.2f} | "
        f"{r.facts_per_second:,.0f} | {r.store_facts_per_second:,.0f} | {r.cpu_seconds:.2f} | "
        f"{r.cpu_us_per_record:.1f} | {r.store_cpu_us_per_record:.1f} | "
        f"{r.load_average_before:.2f} / {r.load_average_after:.2f} |"
        for r in runs
    )
    spread = "".join(
        f" {backend}: {result[f'{backend}_runs']} runs, records/s {_range(result[f'{backend}_facts_per_second_spread'], 0)}"
        f", CPU µs/record {_range(result[f'{backend}_cpu_us_per_record_spread'], 1)}."
        for backend in best
    )
    machine = result["machine"]
    return (
        "# Ledger ingest throughput\n\n"
        f"`{result['command']}`: {args.records:,} JSONL records ({args.duplicate_ratio:.0%} duplicates) read, "
        "parsed as ingest parses them (`ingest.documents.parse_line`, `observed_at` with "
        "`ingest.facts.parse_timestamp`; ingest's validation is measured by `bench.ingest`) and stored with "
        f"`store.ledger.add_facts` in transactions of {args.batch_size} records (dedup, supersession and "
        "provenance included).\n\n"
        "| back-end | records | facts stored | duplicates | seconds | records/s | records/s, storing only "
        "| client CPU seconds | CPU µs/record | storing CPU µs/record | load average at start / end |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Spread (lowest / median / highest; the headline keys come from the fastest run):{spread}\n\n"
        f"The input has {unique:,} distinct records. More facts are stored when CounterFact gives one prompt "
        "several targets and a repeat of a superseded target arrives: that makes a new fact (docs/ledger.md, "
        "'Dedup and conflicts').\n\n"
        "`records/s` (the `*_facts_per_second` keys) counts wall time from opening the file to the last commit; "
        "`storing only` excludes reading and parsing. CPU µs/record is this process's CPU time (SQLite runs "
        "inside it; the Postgres server's work is not counted), which is what the code controls on a shared "
        f"machine. Target: >= {TARGET_SQLITE:,} facts/s on SQLite. SQLite settings: {_sqlite_settings()}; "
        "a committed transaction is in the WAL before COMMIT returns, so it survives a crash of the process; "
        "an OS crash or power loss can lose the last transactions (synchronous=FULL would prevent that at an "
        "fsync per commit). "
        f"Machine: {machine['cpus']} CPUs shared with other work (load average at the end "
        f"{machine['load_average_at_end']}), Python {machine['python']}, SQLAlchemy {machine['sqlalchemy']}, "
        f"SQLite {machine['sqlite']}.\n"
    )


def _range(values: list[float], digits: int) -> str:
    return " / ".join(f"{value:,.{digits}f}" for value in values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--records", type=int, default=100_000, help="input records (default 100,000)")
    parser.add_argument("--duplicate-ratio", type=float, default=0.1, help="share of repeated records")
    parser.add_argument(
        "--batch-size", type=int, default=2000, help="records per add_facts call and transaction (ingest.commit_every)"
    )
    parser.add_argument("--data", type=Path, default=DATA, help="CounterFact JSON to build the input from")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("KED_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="server for the Postgres run (a throwaway schema is created and dropped)",
    )
    parser.add_argument("--skip-postgres", action="store_true", help="measure SQLite only")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per back-end, each in a new process on a new ledger; the fastest is the headline",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where ledger.json and ledger.md go")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def measure(args: argparse.Namespace) -> tuple[list[Run], int]:
    """One run per back-end in this process; returns the runs and the number of distinct input records."""
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="ked-bench-") as tmp:
        path = Path(tmp) / "facts.jsonl"
        unique = write_input(path, args.data, args.records, args.duplicate_ratio, args.seed)
        runs.append(
            run_backend("sqlite", f"sqlite:///{Path(tmp) / 'ledger.sqlite3'}", path, args.records, args.batch_size)
        )
        print(f"sqlite: {runs[-1]}", file=sys.stderr)
        if not args.skip_postgres:
            url, schema = postgres_schema_url(args.postgres_url)
            try:
                runs.append(run_backend("postgres", url, path, args.records, args.batch_size))
            finally:
                drop_schema(args.postgres_url, schema)
            print(f"postgres: {runs[-1]}", file=sys.stderr)
    return runs, unique


def measure_in_processes(args: argparse.Namespace) -> tuple[list[Run], int]:
    """`args.repeat` runs of `measure`, each in a new process (see `measure` for what it returns).

    A run includes one-time costs (SQLAlchemy compiles and caches its statements on first use, about
    75 ms), so later runs in one process would look faster than a single run does.
    """
    runs: list[Run] = []
    unique = 0
    command = [sys.executable, "-m", "bench.ledger", "--records", str(args.records)]
    command += ["--duplicate-ratio", str(args.duplicate_ratio), "--batch-size", str(args.batch_size)]
    command += ["--data", str(args.data), "--postgres-url", args.postgres_url, "--seed", str(args.seed)]
    command += ["--skip-postgres"] if args.skip_postgres else []
    command += [
        f"--{name.replace('_', '-')}={value}" for name in ("config", "state_dir") if (value := getattr(args, name))
    ]
    with tempfile.TemporaryDirectory(prefix="ked-bench-runs-") as tmp:
        for number in range(args.repeat):
            folder = Path(tmp) / str(number)
            subprocess.run(
                [*command, "--results-dir", str(folder)], check=True, cwd=Path(__file__).resolve().parents[1]
            )
            result = json.loads((folder / "ledger.json").read_text(encoding="utf-8"))
            runs.extend(Run(**run) for run in result["runs"])
            unique = result["distinct_input_records"]
    return runs, unique


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"python -m bench.ledger: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.logging, stream=sys.stderr)
    if not args.data.is_file():
        print(f"python -m bench.ledger: data file {args.data} not found; pass --data", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("python -m bench.ledger: --repeat must be at least 1", file=sys.stderr)
        return 2
    if args.repeat == 1:
        runs, unique = measure(args)
    else:
        runs, unique = measure_in_processes(args)
    write_results(runs, args, unique)
    return 0


if __name__ == "__main__":
    sys.exit(main())
