"""The model lock: one process at a time holds the model (and may change the artefacts) of a state directory.

The running daemon holds it for its whole life; an offline `python -m daemon.ledger revert` or
`export-model` takes it for the duration of the command. It is an OS file lock (`filelock`), so
the kernel releases it when the holder dies, even by SIGKILL: a crashed daemon never leaves a
stale lock. Next to the lock file, the holder writes who it is, for the error message of the next.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

LOCK_NAME = "model.lock"
HOLDER_NAME = "model.lock.holder"


class ModelInUse(RuntimeError):
    """Another process holds the model of this state directory."""


class ModelLock:
    """An exclusive, non-reentrant lock on the model of `state_dir`; use as a context manager.

    `timeout` seconds to wait (0: fail at once). Raises ModelInUse naming the holder (pid, purpose,
    since when) and what to do.
    """

    def __init__(self, state_dir: Path, purpose: str, timeout: float = 0.0) -> None:
        self.state_dir = Path(state_dir)
        self.purpose = purpose
        self.timeout = timeout
        # preserve_lock_file: unlinking on release would let a waiter lock a file that is no longer the lock.
        self._lock = FileLock(
            str(self.state_dir / LOCK_NAME), timeout=timeout, thread_local=False, preserve_lock_file=True
        )

    @property
    def held(self) -> bool:
        return bool(self._lock.is_locked)

    def holder(self) -> dict[str, object] | None:
        """What the current (or last) holder wrote about itself, or None."""
        try:
            value = json.loads((self.state_dir / HOLDER_NAME).read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def acquire(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            who = self.holder() or {}
            raise ModelInUse(
                f"the model of {self.state_dir} is held by another process (pid {who.get('pid', '?')}, "
                f"{who.get('purpose', 'unknown purpose')}, since {who.get('since', '?')}); with the daemon "
                "running, file a revert request instead of changing the model offline, or stop the daemon first"
            ) from None
        info = {"pid": os.getpid(), "purpose": self.purpose, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (self.state_dir / HOLDER_NAME).write_text(json.dumps(info))

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
