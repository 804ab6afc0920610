"""`python -m ingest`: import fact files or URLs once into the ledger and print a summary.

Argument parsing, start-up (`daemon.bootstrap`: settings, logging to stderr, the ledger with every
`[store]` option, created when missing) and the summary; reading and recording the inputs is
`ingest.inputs`. Exit codes: 0 the inputs were processed (rejections included); 1 an input could not
be read at all (missing file, failed fetch: listed in the summary and recorded as a rejection);
2 usage or configuration errors; 3 the ledger cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from daemon.bootstrap import command_parser, command_settings, open_ledger
from ingest.inputs import import_inputs
from ingest.recording import Tally
from store.db import make_session_factory
from store.errors import LedgerUnavailable

PROG = "python -m ingest"


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(PROG, "Import fact files (JSONL, JSON, .jsonl.gz) or http(s) URLs once into the ledger.")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_URL", help="fact files or http(s) URLs")
    return parser


def summary(tally: Tally) -> dict[str, Any]:
    """The summary printed by the command (the --json form)."""
    return {
        "accepted": tally.accepted,
        "held": tally.held,
        "duplicates": tally.duplicates,
        "rejected": tally.rejected,
        "errors": [
            {
                "origin": {"source": r.origin.source, "location": r.origin.location, "position": r.origin.position},
                "reason": r.reason,
            }
            for r in tally.rejections
        ],
    }


def format_summary(tally: Tally) -> str:
    """The human-readable summary: counts, then one line per rejection."""
    lines = [f"accepted: {tally.accepted}", f"duplicates: {tally.duplicates}", f"rejected: {tally.rejected}"]
    if tally.held:  # accepted, but waiting in the review queue or for the source's limits (docs/trust.md)
        lines.insert(1, f"held: {tally.held} (see python -m daemon.ledger review)")
    for r in tally.rejections:
        where = r.origin.location + (f" {r.origin.position}" if r.origin.position else "")
        lines.append(f"  {where}: {r.reason}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m ingest`; returns the exit code."""
    args = build_parser().parse_args(argv)
    settings = command_settings(args, prog=PROG, log_stream=sys.stderr)  # stdout carries the summary
    if settings is None:
        return 2
    try:
        engine = open_ledger(settings)
    except LedgerUnavailable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 3
    try:
        tally, all_read = import_inputs(args.inputs, settings.ingest, make_session_factory(engine))
    finally:
        engine.dispose()
    sys.stdout.write(json.dumps(summary(tally), ensure_ascii=False) + "\n" if args.json else format_summary(tally))
    return 0 if all_read else 1
