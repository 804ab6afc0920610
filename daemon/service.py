"""The daemon's service object and its lifecycle: build from settings, run until told to stop, close.

What runs today: the ledger (migrated to head on start, facts stuck in `editing` put back to
`pending`), every configured fact source polled by APScheduler, the HTTP API with Prometheus
metrics, the model with a consistent query path, and a housekeeping job. The edit loop, the commit
gate and first-run editor training join it in later work (README, "Status"); the service says so in
its `ready` log line and in /readyz, which stays 503 ("editor: missing") until they do.

Signals: the first SIGTERM/SIGINT asks for a stop at the next safe point (while the model is still
loading, start-up is abandoned at once); a second one forces the exit.
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

import prometheus_client
import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from daemon.api import create_app
from daemon.api_guards import check_exposure
from daemon.config import Settings
from daemon.http_server import HttpServer
from daemon.ledger_view import LedgerView
from daemon.metrics import Metrics
from daemon.view import DaemonView
from editing.loading import load_model
from editing.targets import default_edit_modules
from editing.weights import WeightState
from ingest.scheduling import schedule_sources, source_health
from store import queries
from store.db import make_engine, make_read_session_factory, make_session_factory, safe_url, upgrade_to_head
from store.lock import ModelLock
from store.work import reset_stuck_editing

log = structlog.get_logger(__name__)

# What the service does not do yet; in the `ready` line so nobody mistakes it for the full service.
NOT_YET = ("edit loop", "commit gate", "first-run editor training", "revert of live weights")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HOUSEKEEPING_SECONDS = 15.0


class StartupAborted(BaseException):
    # A BaseException, like KeyboardInterrupt, so that no `except Exception` in a library swallows it.
    """A stop signal arrived while the service was still starting."""


@dataclass
class Service:
    """The long-running daemon. `run()` blocks until `request_stop()` or a signal, then closes."""

    settings: Settings
    handle_signals: bool = True
    registry: prometheus_client.CollectorRegistry | None = None
    should_exit: threading.Event = field(default_factory=threading.Event)
    force_exit: bool = False
    started: bool = False
    view: DaemonView | None = None
    metrics: Metrics | None = None
    _engine: Engine | None = None
    _scheduler: BackgroundScheduler | None = None
    _server: HttpServer | None = None
    _lock: ModelLock | None = None
    _read_sessions: Any = None

    # --- start-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the ledger, start the sources and the API, load the model; afterwards the service runs."""
        began = time.monotonic()
        settings = self.settings
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        check_exposure(settings.api)
        self._lock = ModelLock(settings.state_dir, "daemon")
        self._lock.acquire()
        self._open_ledger()
        self._start_api()
        self._start_scheduler()
        self._load_model()
        self.started = True
        log.info(
            "ready",
            model_type=self.view.model.model_type if self.view and self.view.model else None,
            fingerprint=self.view.model.fingerprint[:16] if self.view and self.view.model else None,
            api=self._server.url if self._server else None,
            seconds=round(time.monotonic() - began, 2),
            not_yet_implemented=list(NOT_YET),
        )

    def _open_ledger(self) -> None:
        settings = self.settings
        self._engine = make_engine(
            settings.ledger_url(),
            sqlite_busy_timeout_ms=settings.store.sqlite_busy_timeout_ms,
            sqlite_cache_mb=settings.store.sqlite_cache_mb,
        )
        upgrade_to_head(self._engine)
        sessions = make_session_factory(self._engine)
        with sessions.begin() as session:
            stuck = reset_stuck_editing(session=session)
        if stuck:
            log.warning("facts left in editing by the last run are pending again", facts=len(stuck))
        self.metrics = Metrics(self.registry or prometheus_client.REGISTRY, settings.metrics)
        # Fact submission writes, so the API's ledger view uses the ordinary (immediate) sessions; the
        # read-only factory serves the housekeeping reads without queueing behind writers.
        self._read_sessions = make_read_session_factory(self._engine)
        self.view = DaemonView(ledger=LedgerView(sessions, settings.ingest, self.metrics), sessions=sessions)
        self.metrics.set_editor_state("missing")
        self.metrics.set_ready(False)
        log.info("ledger open", url=safe_url(settings.ledger_url()))

    def _start_api(self) -> None:
        if not self.settings.api.enabled or self.view is None or self.metrics is None:
            return
        self._server = HttpServer(create_app(self.settings.api, self.view, self.metrics), self.settings.api)
        self._server.start()
        log.info("api listening", url=self._server.url)

    def _start_scheduler(self) -> None:
        assert self.view is not None
        scheduler = BackgroundScheduler(timezone="UTC")
        jobs = schedule_sources(
            scheduler, self.settings.ingest, self.view.sessions, drop_folder=self.settings.drop_folder()
        )
        scheduler.add_job(
            self.housekeeping,
            "interval",
            seconds=HOUSEKEEPING_SECONDS,
            id="housekeeping",
            max_instances=1,
            coalesce=True,
        )
        scheduler.start()
        self._scheduler = scheduler
        log.info("sources scheduled", sources=[job.id for job in jobs], drop_folder=str(self.settings.drop_folder()))

    def _load_model(self) -> None:
        assert self.view is not None and self.metrics is not None
        settings = self.settings
        log.info("loading model", source=settings.model.source, device=settings.model.device)
        loaded = load_model(settings.model, cache_dir=settings.model_cache_dir())
        names = settings.model.edit_modules or default_edit_modules(loaded.model_type, loaded.num_layers)
        self.view.weights = WeightState(loaded.model, names)
        self.view.model = loaded
        self.metrics.set_model_info(model_type=loaded.model_type, fingerprint=loaded.fingerprint)
        self.housekeeping()

    # --- running ------------------------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Refresh the gauges that mirror the ledger (fact counts, version, source health, readiness)."""
        if self.view is None or self.metrics is None:
            return
        try:
            with self._read_sessions() as session:
                summary = queries.status_summary(session)
                health = source_health(session, self.settings.ingest)
        except SQLAlchemyError as exc:
            log.warning("housekeeping: ledger not reachable", error=str(exc).splitlines()[0])
            self.metrics.set_ready(False)
            return
        self.metrics.set_fact_counts(summary.by_status)
        last = summary.last_commit
        self.metrics.set_model_state(version=summary.current_version, last_commit_at=last.created_at if last else None)
        for source in health:
            self.metrics.set_source_health(
                source.name, up=source.healthy, consecutive_failures=source.consecutive_failures
            )
        self.metrics.set_ready(not self.view.readiness())

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
            # Nothing is written while the service starts, so start-up is abandoned at once rather
            # than finishing a model load that may take minutes.
            raise StartupAborted

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if not self.handle_signals:
            yield
            return
        previous: dict[signal.Signals, Any] = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
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
                try:
                    self.start()
                except StartupAborted:
                    log.info("stopped during start-up")
                    return 0
                while not self.should_exit.wait(timeout=0.5):
                    pass
            finally:
                self.close()
        return 0

    def close(self) -> None:
        """Stop polling and serving, release the ledger and the model lock. Bounded in time."""
        if self.view is not None:
            self.view.stopping = True
        if self._scheduler is not None:
            # Jobs in flight finish their current transaction or lose it whole; no need to wait for them.
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._lock is not None and self._lock.held:
            self._lock.release()
        self._lock = None
        log.info("stopped")
