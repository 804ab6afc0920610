"""Read and steer the edit ledger from the command line (`python -m daemon.ledger`).

Commands: `status`, `log`, `show FACT_ID | vVERSION`, `facts`, `requeue`, `export`, `revert`. Output
is readable text by default and JSON with `--json`. The schema is upgraded to head before any
command runs. Exit codes: 0 done, 1 the ledger refused (unknown id or version, illegal status
change), 2 bad arguments or configuration, 3 the ledger cannot be reached.

`revert` records the audit row and moves the facts; restoring the weights is the daemon's job (see
docs/ledger.md, "Revert").
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy.orm import Session

from daemon.config import ConfigError, Settings, add_common_arguments, settings_from_args
from daemon.logs import configure_logging
from store import work as store_work
from store.db import make_engine, make_read_session_factory, make_session_factory, upgrade_to_head
from store.errors import LedgerError, LedgerUnavailable
from store.ledger import requeue, revert_last, revert_to
from store.models import FactStatus
from store.queries import (
    commit_detail,
    export_facts,
    fact_detail,
    find_facts,
    list_commits,
    list_reverts,
    status_summary,
)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
STATUSES = tuple(status.value for status in FactStatus)
REQUEUEABLE = tuple(status.value for status in store_work.REQUEUEABLE)
READ_COMMANDS = frozenset({"status", "log", "show", "facts", "export"})
_SHOW_ARGUMENT = re.compile(r"^(?:(?P<fact>\d+)|v(?P<version>\d+))$")


class UsageError(ValueError):
    """Arguments argparse accepted but that make no sense together."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m daemon.ledger", description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of readable text")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", parents=[common], help="counts by state and source, current version")
    log = commands.add_parser("log", parents=[common], help="commits, newest first")
    log.add_argument("--limit", type=_positive, default=None, help="show at most N commits")
    show = commands.add_parser("show", parents=[common], help="one fact (FACT_ID) or one commit (vVERSION)")
    show.add_argument("what", metavar="FACT_ID|vVERSION")
    facts = commands.add_parser("facts", parents=[common], help="list facts")
    _add_filters(facts)
    facts.add_argument("--limit", type=_positive, default=None, help="list at most N facts")
    requeue = commands.add_parser("requeue", parents=[common], help="give rejected/failed/reverted facts another try")
    requeue.add_argument("ids", nargs="*", type=_positive, metavar="FACT_ID")
    requeue.add_argument("--status", choices=REQUEUEABLE, help="requeue every fact in this status")
    export = commands.add_parser("export", help="facts as JSONL in the ingest format")
    _add_filters(export)
    export.add_argument("--output", type=Path, default=None, help="write to this file (default: stdout)")
    revert = commands.add_parser("revert", parents=[common], help="revert commits (audit row and fact states)")
    target = revert.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", type=_version, dest="to_version", metavar="VERSION", help="version to return to")
    target.add_argument("--last", type=_positive, metavar="N", help="revert the newest N active commits")
    revert.add_argument("--reason", default=None, help="why (kept in the audit trail)")
    revert.add_argument("--requested-by", default=None, help="who asks (default: cli:<user name>)")
    return parser


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--status", choices=STATUSES, help="only facts in this status")
    parser.add_argument("--source", metavar="NAME", help="only facts that arrived from this source")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _version(text: str) -> int:
    digits = text[1:] if text.startswith("v") else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"expected a version such as 3 or v3 (0 is the base model), got {text!r}")
    return int(digits)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m daemon.ledger`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"python -m daemon.ledger: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Logs go to stderr so that stdout stays clean for --json and export.
    configure_logging(settings.logging, stream=sys.stderr)
    return run(args, settings)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Open the ledger named by `settings`, upgrade it and run the command in `args`."""
    try:
        engine = make_engine(
            settings.ledger_url(),
            sqlite_busy_timeout_ms=settings.store.sqlite_busy_timeout_ms,
            sqlite_cache_mb=settings.store.sqlite_cache_mb,
        )
        upgrade_to_head(engine)
    except LedgerUnavailable as exc:
        print(f"python -m daemon.ledger: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        # Read commands never wait for the daemon's writes; requeue and revert take the write lock.
        factory = make_read_session_factory if args.command in READ_COMMANDS else make_session_factory
        with factory(engine)() as session, session.begin():
            COMMANDS[args.command](session, args, sys.stdout)
        return EXIT_OK
    except UsageError as exc:
        print(f"python -m daemon.ledger {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LedgerError as exc:
        print(f"python -m daemon.ledger {args.command}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        engine.dispose()


# --- commands: each gets the session (inside one transaction), the arguments and stdout ------------


def cmd_status(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    summary = status_summary(session)
    if args.json:
        return _print_json(out, summary)
    last = summary.last_commit
    lines = [f"version     v{summary.current_version}" + (" (base model)" if summary.current_version == 0 else "")]
    if last is not None:
        lines.append(f"last commit {_commit_line(last)}")
    lines.append("facts       " + _counts(summary.by_status))
    for name, counts in sorted(summary.by_source.items()):
        lines.append(f"  {name}: {_counts(counts)}")
    lines.append(f"rejections  {summary.rejections}")
    for source in summary.sources:
        health = "healthy" if source.healthy else f"FAILING x{source.consecutive_failures}: {source.last_error}"
        lines.append(f"source      {source.name} ({source.kind}, {source.location}) {health}")
    out.write("\n".join(lines) + "\n")


def cmd_log(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    commits = list_commits(session, limit=args.limit)
    if args.json:
        return _print_json(out, {"commits": commits, "reverts": list_reverts(session)})
    if not commits:
        out.write("no commits yet (the model is the base model, v0)\n")
    for commit in commits:
        out.write(_commit_line(commit) + "\n")


def cmd_show(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    match = _SHOW_ARGUMENT.match(args.what)
    if match is None:
        raise UsageError(f"expected a fact id (e.g. 42) or a version (e.g. v3), got {args.what!r}")
    if match["fact"] is not None:
        detail: Any = fact_detail(session, int(match["fact"]))
    else:
        detail = commit_detail(session, int(match["version"]))
    if args.json:
        return _print_json(out, detail)
    for key, value in dataclasses.asdict(detail).items():
        if key == "origins":  # one arrival per line: source, place, time
            for origin in value:
                place = " ".join(str(origin[k]) for k in ("location", "position") if origin[k])
                out.write(f"{'origin':18} {origin['source']}: {place} at {_plain(origin['received_at'])}\n")
            continue
        out.write(f"{key:18} {_plain(value)}\n")


def cmd_facts(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    status = FactStatus(args.status) if args.status else None
    rows = find_facts(session, status=status, source=args.source, limit=args.limit)
    if args.json:
        return _print_json(out, rows)
    for row in rows:
        version = f"v{row.commit_version}" if row.commit_version else "-"
        text = _shorten(f"{row.prompt} -> {row.target_new}", 80)
        out.write(f"{row.id:>8} {row.status:<10} {version:>5} {row.source:<16} {text}\n")
    out.write(f"{len(rows)} fact(s)\n")


def cmd_requeue(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    if bool(args.ids) == bool(args.status):
        raise UsageError("give fact ids or --status (one of rejected, failed, reverted), not both")
    if args.status:
        ids = requeue(session=session, status=FactStatus(args.status))
    else:
        ids = requeue(session=session, fact_ids=args.ids)
    if args.json:
        return _print_json(out, {"requeued": ids})
    out.write(f"requeued {len(ids)} fact(s)" + (f": {_id_list(ids)}" if ids else "") + "\n")


def cmd_export(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    status = FactStatus(args.status) if args.status else None
    records = export_facts(session, status=status, source=args.source)
    if args.output is None:
        _write_jsonl(out, records)
        return
    try:
        with args.output.open("w", encoding="utf-8") as handle:
            count = _write_jsonl(handle, records)
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
    print(f"exported {count} fact(s) to {args.output}", file=sys.stderr)


def cmd_revert(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    who = args.requested_by or f"cli:{_user_name()}"
    if args.last is not None:
        audit = revert_last(session=session, count=args.last, reason=args.reason, requested_by=who)
    else:
        audit = revert_to(session=session, to_version=args.to_version, reason=args.reason, requested_by=who)
    if args.json:
        return _print_json(out, {column: getattr(audit, column) for column in _REVERT_COLUMNS})
    out.write(
        f"revert #{audit.id}: v{audit.from_version} -> v{audit.to_version}, {audit.reverted_commits} commit(s) "
        f"and {audit.reverted_facts} fact(s) reverted; the daemon restores the weights of "
        f"v{audit.to_version} before its next edit\n"
    )


_REVERT_COLUMNS = (
    "id",
    "requested_at",
    "from_version",
    "to_version",
    "reason",
    "requested_by",
    "reverted_commits",
    "reverted_facts",
)

COMMANDS: dict[str, Callable[[Session, argparse.Namespace, IO[str]], None]] = {
    "status": cmd_status,
    "log": cmd_log,
    "show": cmd_show,
    "facts": cmd_facts,
    "requeue": cmd_requeue,
    "export": cmd_export,
    "revert": cmd_revert,
}


# --- rendering ---------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def _print_json(out: IO[str], value: Any) -> None:
    out.write(json.dumps(_jsonable(value), indent=2, ensure_ascii=False) + "\n")


def _write_jsonl(out: IO[str], records: Iterable[dict[str, Any]]) -> int:
    count = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count


def _plain(value: Any) -> str:
    value = _jsonable(value)
    if value is None:
        return "-"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value)


def _commit_line(commit: Any) -> str:
    when = _jsonable(commit.created_at)
    state = f" REVERTED by revert #{commit.reverted_by}" if commit.reverted_by else ""
    return (
        f"v{commit.version} (parent v{commit.parent_version}) {when} {commit.fact_count} fact(s) "
        f"gate {commit.gate_verdict}{state}"
    )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{status} {count}" for status, count in counts.items())


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _id_list(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:20]))
    return shown + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
