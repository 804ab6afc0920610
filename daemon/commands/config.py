"""`python -m daemon.config`: print the effective settings as JSON, or the configuration reference page.

    python -m daemon.config --config config.toml     # the settings after file, environment and options
    python -m daemon.config --reference > docs/configuration.md

Exit codes: 0 printed, 2 bad usage or configuration (the message names each bad key).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from daemon.bootstrap import command_parser, command_settings
from daemon.config import reference_markdown

PROG = "python -m daemon.config"


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(PROG, __doc__.splitlines()[0])
    parser.add_argument("--reference", action="store_true", help="print the configuration reference (Markdown)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m daemon.config`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.reference:
        sys.stdout.write(reference_markdown())
        return 0
    settings = command_settings(args, prog=PROG, log_stream=sys.stderr)  # stdout carries the JSON
    if settings is None:
        return 2
    sys.stdout.write(settings.model_dump_json(indent=2) + "\n")
    return 0
