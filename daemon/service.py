"""The daemon's service object and its lifecycle: build from settings, run until told to stop, close.

Start-up, in order: the model lock; the ledger (migrated to head, facts left in `editing` by a crash
put back to `pending`); the HTTP API (answers /healthz at once, /readyz says what is still missing);
the fact sources and housekeeping on APScheduler; the model, then the model state recovered from the
artefacts to the ledger's current version (hash verified); then the editor: loaded from its checkpoint,
or trained on first run in a background thread while ingestion and queries go on. The edit loop
(`daemon.edit_loop`) runs as a scheduler job once the editor is ready.

Signals: the first SIGTERM/SIGINT asks for a stop: polling stops, the in-flight batch finishes its
commit or is rolled back at the gate's next try (its facts back to `pending`), training stops after its
current batch, and the process exits 0 within `[edit_loop] stop_timeout_seconds`. While the model is
still loading, start-up is abandoned at once. A second signal exits at once (code 1); nothing durable
is lost either way, because every commit is crash-safe and recovery runs at the next start.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

import prometheus_client
import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from daemon.api import create_app
from daemon.api_guards import check_exposure
from daemon.bootstrap import load_editor, load_model, open_ledger, open_model_state
from daemon.config import Settings
from daemon.edit_loop import EditLoop
from daemon.first_run import TrainingStopped, checkpoint_exists, checkpoint_id, train_editor
from daemon.http_server import HttpServer
from daemon.ledger_view import LedgerView
from daemon.metrics import Metrics
from daemon.model_state import edited_modules
from daemon.publishing import Publisher
from daemon.review import ANSWER_TOKENS, ReviewDesk
from daemon.service_state import EditorState, ServiceState
from daemon.view import DaemonView
from editing.errors import EditingError
from editing.gate.specificity import FrozenBase, ReferenceStore
from editing.model.loading import LoadedModel
from ingest.polling import Poll
from ingest.scheduling import schedule_sources, source_health
from ingest.trust import ProtectedFactsError, source_rules
from store import queries, trust
from store.artefacts import ArtefactError
from store.db import make_read_session_factory, make_session_factory, safe_url
from store.lock import ModelLock
from store.work import reset_stuck_editing

log = structlog.get_logger(__name__)

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
    #: What the service is doing: written here and by the edit loop, read by the API and the metrics.
    state: ServiceState = field(default_factory=ServiceState)
    metrics: Metrics | None = None
    _engine: Engine | None = None
    _scheduler: BackgroundScheduler | None = None
    _server: HttpServer | None = None
    _lock: ModelLock | None = None
    _read_sessions: Any = None
    edit_loop: EditLoop | None = None
    publisher: Publisher | None = None
    _trainer: threading.Thread | None = None

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
        self._start_editor()
        log.info(
            "ready",
            model_type=self.view.model.model_type if self.view and self.view.model else None,
            fingerprint=self.view.model.fingerprint[:16] if self.view and self.view.model else None,
            version=self.view.weights.version if self.view and self.view.weights else None,
            editor=self.state.now().editor,
            api=self._server.url if self._server else None,
            seconds=round(time.monotonic() - began, 2),
        )

    def _open_ledger(self) -> None:
        settings = self.settings
        self._engine = open_ledger(settings)
        sessions = make_session_factory(self._engine)
        with sessions.begin() as session:
            stuck = reset_stuck_editing(session=session)
        if stuck:
            log.warning("facts left in editing by the last run are pending again", facts=len(stuck))
        self.metrics = Metrics(self.registry or prometheus_client.REGISTRY, settings.metrics)
        # Fact submission writes, so the API's ledger view uses the ordinary (immediate) sessions; the
        # read-only factory serves the housekeeping reads without queueing behind writers.
        self._read_sessions = make_read_session_factory(self._engine)
        self.view = DaemonView(
            ledger=LedgerView(sessions, settings.ingest, self.metrics), sessions=sessions, state=self.state
        )
        self.metrics.watch(self.state, self.view.readiness)
        self.metrics.watch_sources(source_rules(settings.ingest))
        log.info("ledger open", url=safe_url(settings.ledger_url()))

    def _start_api(self) -> None:
        if not self.settings.api.enabled or self.view is None or self.metrics is None:
            return
        view = self.view

        def answer(prompt: str) -> str:
            return view.query(prompt, (), ANSWER_TOKENS).completion.strip()

        review = ReviewDesk(view.sessions, answer, self.metrics)
        self._server = HttpServer(create_app(self.settings.api, view, self.metrics, review), self.settings.api)
        self._server.start()
        log.info("api listening", url=self._server.url)

    def _start_scheduler(self) -> None:
        assert self.view is not None
        scheduler = BackgroundScheduler(timezone="UTC")
        jobs = schedule_sources(
            scheduler,
            self.settings.ingest,
            self.view.sessions,
            drop_folder=self.settings.drop_folder(),
            observer=self._observe_poll,
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

    def _observe_poll(self, source: str, poll: Poll, seconds: float, failures: int) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_source_poll(source, ok=poll.failure is None, seconds=seconds, consecutive_failures=failures)
        tally = poll.tally
        self.metrics.observe_held(source, tally.held)
        if tally.accepted or tally.duplicates or tally.rejections:
            self.metrics.observe_ingest(
                source,
                accepted=tally.accepted,
                duplicates=tally.duplicates,
                rejection_reasons=[r.reason for r in tally.rejections],
            )

    def _load_model(self) -> None:
        assert self.view is not None and self.metrics is not None
        settings = self.settings
        log.info("loading model", source=settings.model.source, device=settings.model.device)
        loaded = load_model(settings)
        names = edited_modules(settings, loaded)
        # The base values of the edited weights, taken before recovery publishes any edit: the gate and
        # the probes compare against them.
        base = FrozenBase.capture(loaded.model, loaded.fingerprint, [f"{name}.weight" for name in names])
        references = ReferenceStore(base, settings.state_dir / "references")
        history = open_model_state(settings, loaded, self.view.sessions)
        self.edit_loop = EditLoop(
            settings, self.view.sessions, history, loaded, references, self.metrics, self.state, self.should_exit
        )
        if settings.publish.enabled:
            self.publisher = Publisher(settings.publish, loaded, history.state)
            self.edit_loop.publisher = self.publisher
            self.metrics.watch_publisher(self.publisher.stats)
            self.publisher.start()  # publishes the recovered version once
        self.view.weights = history.state
        self.view.model = loaded
        self.view.reverter = self.edit_loop.revert
        self.metrics.set_model_info(model_type=loaded.model_type, fingerprint=loaded.fingerprint)
        self.housekeeping()

    def _start_editor(self) -> None:
        """Load the trained editor, or train one in the background (first run), then start the edit loop."""
        assert self.view is not None and self.view.model is not None
        settings, loaded = self.settings, self.view.model
        directory = settings.editor_checkpoint()
        if checkpoint_exists(directory):
            self._attach_editor(loaded)
        elif settings.edit_loop.train_if_missing:
            self._set_editor(EditorState.TRAINING, f"first run: training an editor into {directory}")
            self._trainer = threading.Thread(target=self._train, args=(loaded,), name="editor-training", daemon=True)
            self._trainer.start()
        else:
            self._set_editor(
                EditorState.MISSING,
                f"no editor checkpoint in {directory} and [edit_loop] train_if_missing is false; "
                "run `python -m editing.train`",
            )
        self._schedule_edit_loop(0.0)

    def _schedule_edit_loop(self, delay: float) -> None:
        # A one-off job that schedules its successor when it ends: a batch may take minutes, and an
        # interval job would pile up skipped runs (and warnings) behind it.
        scheduler = self._scheduler
        if scheduler is None or self.should_exit.is_set():
            return
        when = datetime.now(UTC) + timedelta(seconds=delay)
        scheduler.add_job(self._edit_loop_job, "date", run_date=when, id="edit-loop", replace_existing=True)

    def _edit_loop_job(self) -> None:
        assert self.edit_loop is not None
        try:
            self.edit_loop.tick()
        except Exception:  # one bad pass must not end editing for the life of the process
            log.exception("edit loop pass failed")
        finally:
            self._schedule_edit_loop(self.settings.edit_loop.poll_seconds)

    def _attach_editor(self, loaded: LoadedModel) -> None:
        assert self.edit_loop is not None
        directory = self.settings.editor_checkpoint()
        try:
            editor = load_editor(self.settings, loaded, edited_modules(self.settings, loaded))
            self.edit_loop.attach_editor(editor, checkpoint_id(directory))
        except (EditingError, ArtefactError, OSError) as exc:
            log.error("the editor cannot be used", checkpoint=str(directory), error=str(exc))
            self._set_editor(EditorState.FAILED, str(exc))
            return
        self._set_editor(EditorState.READY, None)
        log.info("editor ready", checkpoint=str(directory))

    def _train(self, loaded: LoadedModel) -> None:
        def progress(done: int, total: int, loss: float) -> None:
            self.state.observe_training(step=done, total=total, loss=loss)
            log.info("editor training", batch=done, batches=total, edit_loss=round(loss, 4))

        try:
            train_editor(
                self.settings, loaded, edited_modules(self.settings, loaded), progress=progress, stop=self.should_exit
            )
        except TrainingStopped:
            log.info("editor training stopped; it starts again at the next start")
            self._set_editor(EditorState.MISSING, "training was stopped")
            return
        except Exception as exc:  # the daemon stays up (ingesting, answering) and says why it cannot edit
            log.exception("editor training failed")
            self._set_editor(EditorState.FAILED, f"training failed: {exc}")
            return
        self._attach_editor(loaded)

    def _set_editor(self, state: EditorState, detail: str | None) -> None:
        self.state.set_editor(state, detail)

    # --- running ------------------------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Refresh the gauges that mirror the ledger (fact counts, version, source health)."""
        if self.view is None or self.metrics is None:
            return
        try:
            with self._read_sessions() as session:
                summary = queries.status_summary(session)
                health = source_health(session, self.settings.ingest)
                queue = trust.queue_summary(session)
        except SQLAlchemyError as exc:
            log.warning("housekeeping: ledger not reachable", error=str(exc).splitlines()[0])
            return
        self.metrics.set_fact_counts(summary.by_status)
        oldest = queue.oldest_held_since
        self.metrics.set_review_queue(
            by_reason=queue.by_reason,
            by_source=queue.by_source,
            oldest_age_seconds=(datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0,
        )
        last = summary.last_commit
        self.metrics.set_model_state(version=summary.current_version, last_commit_at=last.created_at if last else None)
        for source in health:
            self.metrics.set_source_health(
                source.name, up=source.healthy, consecutive_failures=source.consecutive_failures
            )

    def request_stop(self) -> None:
        """Ask the service to stop at the next safe point."""
        self.should_exit.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # The handler only sets flags; the loop acts on them between units of work.
        if self.should_exit.is_set():
            self.force_exit = True
            log.warning("second signal: exiting now", signal=signal.Signals(signum).name)
            # Worker threads (the edit loop, the API) would keep the interpreter alive; every commit is
            # crash-safe and recovery runs at the next start, so leaving at once loses nothing.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
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
                except (EditingError, ArtefactError, ProtectedFactsError) as exc:
                    # The model state cannot be trusted (another model, a corrupt artefact, a hash that
                    # does not match), or the protected facts cannot be read: refuse to serve rather than
                    # answer from unknown weights or edit without the operator's protected answers.
                    log.error("cannot start", error=str(exc), kind=type(exc).__name__)
                    return 1
                while not self.should_exit.wait(timeout=0.5):
                    pass
            finally:
                self.close()
        return 0

    def _wait_for_writer(self) -> None:
        """Let the in-flight batch commit or roll back, and training stop, within the stop timeout."""
        deadline = time.monotonic() + self.settings.edit_loop.stop_timeout_seconds
        if self.edit_loop is not None:
            if self.edit_loop.writer.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self.edit_loop.writer.release()
            else:
                log.warning("the in-flight batch did not finish in time; its facts go back to pending at the next start")
        if self._trainer is not None:
            self._trainer.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._trainer.is_alive():
                log.warning("editor training did not stop in time; it starts again at the next start")

    def close(self) -> None:
        """Stop polling and serving, release the ledger and the model lock. Bounded in time."""
        self.state.stop()
        self.should_exit.set()
        if self._scheduler is not None:
            # Source polls in flight finish their transaction or lose it whole; no need to wait for them.
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        self._wait_for_writer()
        if self.publisher is not None:
            self.publisher.stop()
            self.publisher = None
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
