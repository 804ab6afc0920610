"""`python -m daemon`: parse the command line, load settings, configure logging, run the service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from daemon.config import ConfigError, add_common_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m daemon",
        description="Lifelong knowledge-editing daemon: keeps a language model's facts current.",
    )
    add_common_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m daemon`. Exit codes: 0 clean stop, 2 bad usage or configuration."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"python -m daemon: {exc}", file=sys.stderr)
        return 2

    from daemon.logs import configure_logging
    from daemon.service import Service

    configure_logging(settings.logging)
    return Service(settings).run()
