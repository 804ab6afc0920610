"""The daemon's service object and its lifecycle: build from settings, run until told to stop, close.

Today the service loads the model and waits: ingestion, editing, the gate, the HTTP API and the
metrics join it as their issues land (see README, "Status"). It says so in its start-up log line.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import structlog

from daemon.config import Settings
from editing.loading import LoadedModel, load_model

log = structlog.get_logger(__name__)

# What the service does not do yet; printed at start-up so nobody mistakes it for the full service.
NOT_YET = ("ingestion", "editing", "commit gate", "HTTP API", "metrics endpoint")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StartupAborted(BaseException):  # noqa: N818 - like KeyboardInterrupt, it must pass `except Exception`
    """A stop signal arrived while the service was still starting."""


@dataclass
class Service:
    """The long-running daemon. `run()` blocks until `request_stop()` or a signal, then closes."""

    settings: Settings
    handle_signals: bool = True
    model: LoadedModel | None = None
    should_exit: threading.Event = field(default_factory=threading.Event)
    force_exit: bool = False
    started: bool = False

    def start(self) -> None:
        """Load what the service needs; after this the service is ready."""
        started = time.monotonic()
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        log.info("loading model", source=self.settings.model.source, device=self.settings.model.device)
        self.model = load_model(self.settings.model, cache_dir=self.settings.model_cache_dir())
        log.info(
            "ready",
            model_type=self.model.model_type,
            fingerprint=self.model.fingerprint[:16],
            device=str(self.model.device),
            seconds=round(time.monotonic() - started, 2),
            not_yet_implemented=list(NOT_YET),
        )
        self.started = True

    def request_stop(self) -> None:
        """Ask the service to stop at the next safe point."""
        self.should_exit.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # The handler only sets flags; the loop acts on them between units of work.
        if self.should_exit.is_set():
            self.force_exit = True
            log.warning("second signal: forcing exit", signal=signal.Signals(signum).name)
            raise SystemExit(1)
        log.info("stopping", signal=signal.Signals(signum).name)
        self.should_exit.set()
        if not self.started:
            # Nothing is written while the model loads, so start-up is abandoned at once rather than
            # finishing a load that may take minutes.
            raise StartupAborted

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if not self.handle_signals:
            yield
            return
        previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self) -> int:
        """Start, wait until asked to stop, close. Returns the process exit code."""
        with self._signals():
            try:
                self.start()
            except StartupAborted:
                log.info("stopped during start-up")
                return 0
            while not self.should_exit.wait(timeout=0.5):
                pass
            self.close()
        return 0

    def close(self) -> None:
        """Release what the service holds."""
        self.model = None
        log.info("stopped")
