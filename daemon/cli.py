"""`python -m daemon`: parse the command line, then start-up (`daemon.bootstrap`) and the service."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from daemon.bootstrap import command_parser, command_settings

PROG = "python -m daemon"


def build_parser() -> argparse.ArgumentParser:
    return command_parser(PROG, "Lifelong knowledge-editing daemon: keeps a language model's facts current.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m daemon`.

    Exit codes: 0 clean stop, 1 a model state that cannot be trusted, 2 bad usage or configuration.
    """
    args = build_parser().parse_args(argv)
    settings = command_settings(args, prog=PROG)
    if settings is None:
        return 2
    # Imported here: the service pulls in torch and the API, which `--help` and a bad configuration do not need.
    from daemon.service import Service

    return Service(settings).run()
