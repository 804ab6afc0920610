"""Subprocess driver for the kill-and-restart tests: scans a drop folder once into a ledger.

    python -m tests.ingest.crash_driver LEDGER_URL FOLDER COMMIT_EVERY [STEP N]

With STEP and N, the process sends itself SIGKILL the N-th time the drop folder reaches STEP
("read", "committed", "reported", "moved"): no clean-up, no finally blocks, exactly like `kill -9`.
It prints "ready" once imports are done, so a parent can also kill it after a random delay.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from pathlib import Path

from ingest.config import IngestConfig
from ingest.dropfolder import DropFolder
from store.db import make_engine, make_session_factory, upgrade_to_head


def main(argv: list[str]) -> int:
    url, folder, commit_every = argv[0], Path(argv[1]), int(argv[2])
    crash_step, crash_at = (argv[3], int(argv[4])) if len(argv) > 4 else (None, 0)
    reached: Counter[str] = Counter()

    def on_step(step: str) -> None:
        reached[step] += 1
        if step == crash_step and reached[step] == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    engine = make_engine(url)
    upgrade_to_head(engine)
    config = IngestConfig(settle_seconds=0, commit_every=commit_every)
    print("ready", flush=True)
    DropFolder(folder, config, make_session_factory(engine), on_step=on_step).scan()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
