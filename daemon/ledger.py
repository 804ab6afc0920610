"""Read and steer the edit ledger, and the model state behind it, from the command line (`python -m daemon.ledger`).

Commands: `status`, `log`, `show FACT_ID | vVERSION`, `facts`, `requeue`, `export`, `resume`,
`review`, `approve`, `reject`, `revert`, `export-model`. Output is readable text by default and JSON with `--json`. Start-up is
`daemon.bootstrap`'s: settings, logging to stderr (stdout stays clean for --json and export), the
ledger opened with every `[store]` option and upgraded to head before any command runs. No command
creates a ledger: where the settings point to none (run outside the service's directory without
`--state-dir`, say), every command stops with a message naming the place it looked. Exit codes:
0 done, 1 refused or not carried out (unknown id or version, illegal status change, no pause to
resume, a target beyond the retention horizon, the model held by another command, a revert the
daemon has not applied within `--wait`, a damaged model state), 2 bad arguments or configuration
(no ledger where the settings point, and a configured model that cannot be loaded, included), 3 the
ledger cannot be reached.

`resume` ends the pause in force (the daemon pauses editing on drift, a blocked gate or a revert it
could not apply; the pause outlives restarts): it records the resume in the ledger, which a running
daemon follows at its next pass and a stopped one at its next start. `status` shows the pause in force.

`review` lists the facts held for review or by their source's limits (docs/trust.md), oldest first,
with `--answers` beside the model's current answer (asked of the running daemon's API); `approve` and
`reject` decide held facts by id, `--source`, `--origin`, `--held-for` or `--prompt`, with `--reason`
and `--by` (default `cli:<user name>`) kept in the audit trail that `show` prints. A fact that is not
held, or a filter that matches nothing, is refused (exit 1).

`revert` is exact: with the daemon stopped it takes the model lock, rebuilds the target version from
the artefacts, checks its weights hash and records the revert (`daemon.model_state.revert_model`);
with the daemon running (it holds the lock) it checks the target, records the revert as a request
and waits until the daemon has restored the weights. `export-model` takes no lock: it rebuilds the
version read-only in its own process, so it runs while the daemon runs. See docs/ledger.md, "Revert"
and "Export a model".
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy.orm import Session, sessionmaker

from daemon.bootstrap import LedgerMissing, command_parser, command_settings, load_model, open_ledger, open_model_state
from daemon.commands.export_model import add_export_model_arguments
from daemon.config import Settings
from daemon.review import answers_from_daemon, with_answers
from store import commits as store_commits
from store import pauses as store_pauses
from store import trust as store_trust
from store import work as store_work
from store.db import make_read_session_factory, make_session_factory, serialise_writers
from store.errors import LedgerError, LedgerUnavailable
from store.lock import ModelInUse, ModelLock
from store.models import FactStatus, HoldReason, Pause, Revert
from store.queries import (
    commit_detail,
    export_facts,
    fact_detail,
    find_facts,
    list_commits,
    list_reverts,
    status_summary,
)
from store.work import requeue

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
PROG = "python -m daemon.ledger"
STATUSES = tuple(status.value for status in FactStatus)
REQUEUEABLE = tuple(status.value for status in store_work.REQUEUEABLE)
READ_COMMANDS = frozenset({"status", "log", "show", "facts", "export", "review"})
HOLD_REASONS = tuple(reason.value for reason in HoldReason)
_SHOW_ARGUMENT = re.compile(r"^(?:(?P<fact>\d+)|v(?P<version>\d+))$")
#: The purpose the running daemon names when it takes the model lock (daemon/service.py).
DAEMON_PURPOSE = "daemon"
OFFLINE_REVERT_PURPOSE = "offline revert"
#: How long `revert` waits by default for the running daemon to restore the weights, and how often it looks.
DEFAULT_WAIT_SECONDS = 300.0
POLL_SECONDS = 0.5


class UsageError(ValueError):
    """Arguments argparse accepted but that make no sense together."""


class Refused(RuntimeError):
    """A command that cannot be carried out (exit 1); the message says why and what to do."""


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(PROG, __doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of readable text")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", parents=[common], help="counts by state and source, current version, pause in force")
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
    resume = commands.add_parser("resume", parents=[common], help="end the pause in force: the daemon edits again")
    resume.add_argument(
        "--reason", required=True, type=_text, metavar="TEXT", help="why editing may go on (kept in the ledger)"
    )
    review = commands.add_parser("review", parents=[common], help="facts waiting for review or for their source's limits")
    _add_review_filters(review)
    review.add_argument("--limit", type=_positive, default=None, help="list at most N facts")
    review.add_argument(
        "--answers", action="store_true", help="show the model's current answer beside each proposed one (asks the running daemon)"
    )
    for name, verb in (("approve", "edit them: held -> pending"), ("reject", "never edit them: held -> rejected")):
        decide = commands.add_parser(name, parents=[common], help=f"decide held facts: {verb}")
        decide.add_argument("ids", nargs="*", type=_positive, metavar="FACT_ID")
        _add_review_filters(decide)
        decide.add_argument("--reason", default=None, type=_text, metavar="TEXT", help="why (kept in the audit trail)")
        decide.add_argument("--by", default=None, type=_text, metavar="NAME", help="who decides (default: cli:<user name>)")
    export = commands.add_parser("export", help="facts as JSONL in the ingest format")
    _add_filters(export)
    export.add_argument("--output", type=Path, default=None, help="write to this file (default: stdout)")
    revert = commands.add_parser(
        "revert", parents=[common], help="exact revert: the weights, the audit row and the fact states"
    )
    target = revert.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", type=_version, dest="to_version", metavar="VERSION", help="version to return to")
    target.add_argument("--last", type=_positive, metavar="N", help="revert the newest N active commits")
    revert.add_argument("--reason", default=None, help="why (kept in the audit trail)")
    revert.add_argument("--requested-by", default=None, help="who asks (default: cli:<user name>)")
    revert.add_argument(
        "--wait",
        type=_seconds,
        default=DEFAULT_WAIT_SECONDS,
        metavar="SECONDS",
        help=f"with the daemon running: how long to wait for it to restore the weights (default {DEFAULT_WAIT_SECONDS:g})",
    )
    export_model = commands.add_parser(
        "export-model",
        parents=[common],
        help="the model at a version as a Hugging Face directory or a PEFT adapter (the daemon may run)",
    )
    add_export_model_arguments(export_model)
    return parser


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--status", choices=STATUSES, help="only facts in this status")
    parser.add_argument("--source", metavar="NAME", help="only facts that arrived from this source")


def _add_review_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", metavar="NAME", help="only facts that arrived from this source (e.g. feed:wire)")
    parser.add_argument("--origin", metavar="LOCATION", help="only facts that arrived from this file path or URL")
    parser.add_argument("--held-for", choices=HOLD_REASONS, help="only facts held for this reason")
    parser.add_argument("--prompt", metavar="TEXT", help="only facts whose prompt contains TEXT (any case)")


def _review_filter(args: argparse.Namespace) -> store_trust.ReviewFilter:
    return store_trust.ReviewFilter(
        ids=tuple(args.ids) if getattr(args, "ids", None) else None,
        source=args.source,
        origin=args.origin,
        reason=HoldReason(args.held_for) if args.held_for else None,
        prompt_contains=args.prompt,
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty or whitespace")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _version(text: str) -> int:
    digits = text[1:] if text.startswith("v") else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"expected a version such as 3 or v3 (0 is the base model), got {text!r}")
    return int(digits)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m daemon.ledger`; returns the exit code."""
    args = build_parser().parse_args(argv)
    # Logs go to stderr so that stdout stays clean for --json and export.
    settings = command_settings(args, prog=PROG, log_stream=sys.stderr)
    if settings is None:
        return EXIT_USAGE
    return run(args, settings)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Open the existing ledger named by `settings`, upgrade it and run the command in `args`."""
    try:
        engine = open_ledger(settings, create=False)
    except LedgerMissing as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LedgerUnavailable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        if args.command in MODEL_COMMANDS:
            context = ModelContext(settings, make_session_factory(engine), make_read_session_factory(engine))
            return _run_model_command(MODEL_COMMANDS[args.command], context, args, sys.stdout)
        # Read commands never wait for the daemon's writes; requeue takes the write lock.
        args.api_config = settings.api  # `review --answers` asks the running daemon
        factory = make_read_session_factory if args.command in READ_COMMANDS else make_session_factory
        with factory(engine)() as session, session.begin():
            COMMANDS[args.command](session, args, sys.stdout)
        return EXIT_OK
    except UsageError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (LedgerError, Refused) as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        engine.dispose()


# --- commands: each gets the session (inside one transaction), the arguments and stdout ------------


def cmd_status(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    summary = status_summary(session)
    pause = store_pauses.current_pause(session)
    if args.json:  # "pause": the pause in force, or null while editing runs
        return _print_json(out, dataclasses.asdict(summary) | {"pause": _pause_row(pause, _PAUSE_COLUMNS)})
    last = summary.last_commit
    lines = [f"version     v{summary.current_version}" + (" (base model)" if summary.current_version == 0 else "")]
    if pause is not None:
        lines.append(f"paused      {_pause_line(pause)}")
        lines.append(f"            a revert or `{PROG} resume --reason TEXT` ends it")
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
        if key == "reviews":  # the audit trail: who decided what about the held fact, when and why
            for review in value:
                why = f": {review['reason']}" if review["reason"] else ""
                held = f" (held for {review['hold_reason']})" if review["hold_reason"] else ""
                out.write(f"{'review':18} {review['action']} by {review['reviewer']} at {_plain(review['decided_at'])}{held}{why}\n")
            continue
        out.write(f"{key:18} {_plain(value)}\n")


def cmd_facts(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    status = FactStatus(args.status) if args.status else None
    rows = find_facts(session, status=status, source=args.source, limit=args.limit)
    if args.json:  # each row carries the fact's last error: why its last try did not commit it
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


def cmd_resume(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    pause = store_pauses.current_pause(session)
    if pause is None:
        raise Refused("editing is not paused (no pause in force in the ledger): nothing to resume")
    store_pauses.record_resume(session=session, resumed_by=f"cli:{_user_name()}: {args.reason}")
    session.refresh(pause)
    if args.json:
        return _print_json(out, _pause_row(pause, (*_PAUSE_COLUMNS, "resumed_at", "resumed_by")))
    out.write(
        f"resumed: ended the pause {_pause_line(pause)}; a running daemon edits again at its next pass, "
        "a stopped one when it starts\n"
    )


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


def cmd_review(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    facts = store_trust.held_facts(session, _review_filter(args), limit=args.limit)
    summary = store_trust.queue_summary(session)
    items, problem = with_answers(facts, answers_from_daemon(args.api_config)) if args.answers else (None, None)
    if args.json:
        rows = [item.as_dict() for item in items] if items is not None else facts
        return _print_json(out, {"held": rows, "queue": summary, "answers_missing": problem})
    for index, held in enumerate(facts):
        place = " ".join(p for p in (held.location, held.position or "") if p)
        out.write(f"{held.id:>8} {held.hold_reason:<13} {held.source}: {place} (held since {_plain(held.held_since)})\n")
        out.write(f"{'':>8} prompt   {held.prompt}\n{'':>8} proposed {held.target_new}\n")
        if items is not None and items[index].model_answer is not None:
            out.write(f"{'':>8} model    {items[index].model_answer}\n")
        if held.note:
            out.write(f"{'':>8} why      {held.note}\n")
    if problem:
        out.write(f"({problem})\n")
    out.write(f"{len(facts)} fact(s) shown; {summary.held} held in all: {_counts(summary.by_reason)}\n")


def cmd_approve(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    _decide(session, args, out, store_trust.approve)


def cmd_reject(session: Session, args: argparse.Namespace, out: IO[str]) -> None:
    _decide(session, args, out, store_trust.reject)


def _decide(session: Session, args: argparse.Namespace, out: IO[str], decide: Callable[..., store_trust.ReviewOutcome]) -> None:
    selection = _review_filter(args)
    if selection.is_empty():
        raise UsageError("name the facts: ids, or --source, --origin, --held-for or --prompt")
    reviewer = args.by or f"cli:{_user_name()}"
    outcome = decide(session=session, selection=selection, reviewer=reviewer, reason=args.reason)
    if args.json:
        return _print_json(out, outcome)
    verb = "approved" if outcome.action == "approved" else "rejected"
    out.write(f"{verb} {len(outcome.decided)} fact(s)" + (f": {_id_list(list(outcome.decided))}" if outcome.decided else "") + "\n")
    if outcome.superseded:
        out.write(f"superseded {len(outcome.superseded)} pending fact(s) of the same prompts: {_id_list(list(outcome.superseded))}\n")
    if outcome.skipped:
        out.write(f"skipped {len(outcome.skipped)} decided meanwhile by someone else: {_id_list(list(outcome.skipped))}\n")


_REVERT_COLUMNS = (
    "id",
    "requested_at",
    "from_version",
    "to_version",
    "reason",
    "requested_by",
    "reverted_commits",
    "reverted_facts",
    "weights_restored_at",
)

_PAUSE_COLUMNS = ("id", "paused_at", "reason", "version")

COMMANDS: dict[str, Callable[[Session, argparse.Namespace, IO[str]], None]] = {
    "status": cmd_status,
    "log": cmd_log,
    "show": cmd_show,
    "facts": cmd_facts,
    "requeue": cmd_requeue,
    "export": cmd_export,
    "resume": cmd_resume,
    "review": cmd_review,
    "approve": cmd_approve,
    "reject": cmd_reject,
}


# --- model commands: they hold the model lock (or defer to the daemon that holds it) --------------
#
# The model-state modules import torch (seconds), so they are imported inside these functions: the
# read commands above stay quick.


@dataclasses.dataclass(frozen=True)
class ModelContext:
    """What a model command works with: the settings, and write and read sessions of the ledger."""

    settings: Settings
    sessions: sessionmaker[Session]
    read_sessions: sessionmaker[Session]


ModelCommand = Callable[[ModelContext, argparse.Namespace, IO[str]], int]


def _run_model_command(command: ModelCommand, context: ModelContext, args: argparse.Namespace, out: IO[str]) -> int:
    """Run a model command; the model-state errors become Refused (exit 1) or UsageError (exit 2)."""
    from editing.errors import EditingError, ModelLoadError
    from editing.state.export import ExportError
    from store.artefacts import ArtefactError

    try:
        return command(context, args, out)
    except (ModelLoadError, ExportError) as exc:  # the configured model or the output directory
        raise UsageError(str(exc)) from None
    except (ArtefactError, EditingError, ModelInUse) as exc:
        raise Refused(str(exc)) from None


def cmd_revert(context: ModelContext, args: argparse.Namespace, out: IO[str]) -> int:
    """Exact revert: offline when the model lock is free, else a request the running daemon carries out."""
    who = args.requested_by or f"cli:{_user_name()}"
    lock = ModelLock(context.settings.state_dir, OFFLINE_REVERT_PURPOSE)
    try:
        lock.acquire()
    except ModelInUse:
        return _revert_through_daemon(context, args, out, who, lock.holder())
    try:
        return _revert_offline(context, args, out, who)
    finally:
        lock.release()


def _revert_offline(context: ModelContext, args: argparse.Namespace, out: IO[str], who: str) -> int:
    from daemon.model_state import revert_model, revert_target

    began = time.perf_counter()
    settings = context.settings
    # Everything that can refuse without the model comes first: loading it takes seconds to minutes.
    with context.read_sessions() as session:
        target = revert_target(session, to_version=args.to_version, last=args.last)
        _check_rebuildable(settings, session, target, "revert to")
    loaded = load_model(settings)
    load_seconds = time.perf_counter() - began
    history = open_model_state(settings, loaded, context.sessions)
    # We hold the model lock, so no one else records commits or carries out reverts meanwhile: the
    # target checked above is still the one `--last` meant.
    outcome = revert_model(
        history, context.sessions, to_version=target, last=None, reason=args.reason, requested_by=who
    )
    seconds = time.perf_counter() - began
    with context.read_sessions() as session:
        row = _revert_row(session, outcome.revert_id)
    result = row | {
        "mode": "offline",
        "weights_restored": True,
        "weights_sha256": outcome.weights_sha256,
        "seconds": round(seconds, 3),
        "model_load_seconds": round(load_seconds, 3),
    }
    if args.json:
        _print_json(out, result)
    else:
        out.write(
            f"{_revert_summary(row)}; weights of v{target} restored exactly (sha256 {outcome.weights_sha256[:16]}…) "
            f"in {seconds:.1f} s, {load_seconds:.1f} s of it loading the model (the daemon was not running)\n"
        )
    return EXIT_OK


def _revert_through_daemon(
    context: ModelContext, args: argparse.Namespace, out: IO[str], who: str, holder: dict[str, object] | None
) -> int:
    from daemon.model_state import revert_target

    purpose = holder.get("purpose") if holder else None
    if purpose is not None and purpose != DAEMON_PURPOSE:
        # Only the daemon carries out filed reverts; another offline command would leave the request waiting.
        raise Refused(
            f"the model of {context.settings.state_dir} is held by another command ({purpose}, pid "
            f"{holder.get('pid', '?') if holder else '?'}); try again when it has finished"
        )
    with context.sessions.begin() as session:
        # One transaction: the target is checked against the same ledger state the revert is written to.
        serialise_writers(session)
        target = revert_target(session, to_version=args.to_version, last=args.last)
        _check_rebuildable(context.settings, session, target, "revert to")
        revert_id = store_commits.revert_to(session=session, to_version=target, reason=args.reason, requested_by=who).id
    began = time.monotonic()
    until = f"within {args.wait:g} s"
    try:
        restored = _wait_until_restored(context.read_sessions, revert_id, args.wait)
    except KeyboardInterrupt:  # the revert is recorded either way: say so rather than print a traceback
        restored, until = False, "before the wait was interrupted"
    waited = time.monotonic() - began
    with context.read_sessions() as session:
        row = _revert_row(session, revert_id)
    result = row | {"mode": "daemon", "weights_restored": restored, "waited_seconds": round(waited, 3)}
    if args.json:
        _print_json(out, result)
    elif restored:
        out.write(f"{_revert_summary(row)}; the running daemon restored the weights of v{target} in {waited:.1f} s\n")
    else:
        out.write(f"{_revert_summary(row)}; recorded, waiting for the daemon\n")
    if restored:
        return EXIT_OK
    print(
        f"{PROG} revert: the daemon has not restored the weights of v{target} {until}; "
        f"revert #{revert_id} is recorded and the daemon applies it before its next edit "
        "(or when it next starts); `python -m daemon.ledger log --json` shows weights_restored_at once done",
        file=sys.stderr,
    )
    return EXIT_REFUSED


def _wait_until_restored(read_sessions: sessionmaker[Session], revert_id: int, wait: float) -> bool:
    """Poll the revert's audit row until the daemon sets weights_restored_at; False after `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        with read_sessions() as session:
            row = session.get(Revert, revert_id)
            if row is not None and row.weights_restored_at is not None:
                return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(POLL_SECONDS, left))


def _revert_row(session: Session, revert_id: int) -> dict[str, Any]:
    audit = session.get(Revert, revert_id)
    if audit is None:
        raise LedgerError(f"no revert #{revert_id} in the ledger")
    return {column: getattr(audit, column) for column in _REVERT_COLUMNS}


def _revert_summary(row: dict[str, Any]) -> str:
    return (
        f"revert #{row['id']}: v{row['from_version']} -> v{row['to_version']}, {row['reverted_commits']} commit(s) "
        f"and {row['reverted_facts']} fact(s) reverted"
    )


def _check_rebuildable(settings: Settings, session: Session, version: int, action: str) -> None:
    """Refuse (BeyondHorizon) a version the artefacts left cannot rebuild, naming the horizon; no model needed."""
    from daemon.model_state import artefact_store, check_rebuildable, commit_refs
    from editing.state.history import beyond_horizon, reachable_horizon
    from store.retention import BeyondHorizon

    store = artefact_store(settings)
    try:
        check_rebuildable(store, session, version)
    except BeyondHorizon as exc:
        oldest = reachable_horizon(store, commit_refs(session), store_commits.current_version(session))
        raise beyond_horizon(
            action, version, oldest, settings.store.retention_commits, settings.store.snapshot_every, exc
        ) from None


def cmd_export_model(context: ModelContext, args: argparse.Namespace, out: IO[str]) -> int:
    """Export without the model lock: rebuilt read-only from the base model and the artefacts."""
    from daemon.commands.export_model import run_export_model

    return run_export_model(context.settings, context.read_sessions, args, out)


MODEL_COMMANDS: dict[str, ModelCommand] = {"revert": cmd_revert, "export-model": cmd_export_model}

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


def _pause_row(pause: Pause | None, columns: Sequence[str]) -> dict[str, Any] | None:
    return None if pause is None else {column: getattr(pause, column) for column in columns}


def _pause_line(pause: Pause) -> str:
    return f"since {_jsonable(pause.paused_at)} at v{pause.version}: {pause.reason}"


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
