"""APScheduler jobs for the configured sources, with back-off and health.

`schedule_sources` adds one interval job per enabled source (the drop folder included) to the
caller's scheduler: `max_instances=1`, coalescing, jitter, and an executor of its own ("ingest",
one thread per source) so that a slow or hung source never holds a thread that another source or
the editor needs; HTTP timeouts bound how long it can hang.

Each job is a `SourceJob`. A failed poll (an exception, or a poll that reports a failure such as
a malformed feed) is recorded in the ledger (`sources.consecutive_failures`, `last_error`); after
`n` consecutive failures the source sits out polls for `interval * 2**(n-1)` seconds, at most
`max_backoff_seconds`. From `unhealthy_after_failures` failures on it is reported unhealthy by
`source_health` (and logged once as such).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ingest import jsonl, rss, web
from ingest.config import IngestConfig
from ingest.dropfolder import DropFolder
from ingest.polling import Poll, ledger_name
from ingest.recording import Tally
from store import intake
from store.models import Source

logger = logging.getLogger(__name__)

EXECUTOR = "ingest"

#: Told of every poll that ran: (source name, its result, seconds, consecutive failures after it).
PollObserver = Callable[[str, Poll, float, int], None]


@dataclass(frozen=True)
class SourceHealth:
    """A source's health as the daemon reports it."""

    name: str
    kind: str
    healthy: bool
    consecutive_failures: int
    last_error: str | None
    last_success_at: datetime | None


def backoff_seconds(failures: int, interval: float, cap: float) -> float:
    """Pause after `failures` consecutive failures: 0, then interval * 2**(failures-1), at most `cap`."""
    if failures <= 0:
        return 0.0
    return float(min(cap, interval * 2 ** min(failures - 1, 40)))


class SourceJob:
    """One source's poll as a scheduler job: runs the poll, records failures, applies back-off."""

    def __init__(
        self,
        name: str,
        poll: Callable[[], Poll],
        *,
        interval: float,
        config: IngestConfig,
        session_factory: sessionmaker[Session],
        clock: Callable[[], float] = time.monotonic,
        observer: PollObserver | None = None,
    ) -> None:
        self.name = name
        self.observer = observer
        self.poll = poll
        self.interval = interval
        self.config = config
        self.session_factory = session_factory
        self.clock = clock
        self.failures = 0
        self.resume_at = 0.0  #: monotonic time before which polls are skipped (back-off)

    def __call__(self) -> Poll | None:
        """Run one poll unless backing off. Never raises: failures are recorded and logged."""
        if self.clock() < self.resume_at:
            return None
        began = time.perf_counter()
        try:
            result = self.poll()
        except Exception as exc:  # a source must never take the scheduler down; recorded below
            result = Poll(failure=f"{type(exc).__name__}: {exc}")
            self._record_failure(result.failure or "")
        self._after(result)
        if self.observer is not None:
            try:
                self.observer(self.name, result, time.perf_counter() - began, self.failures)
            except Exception:  # metrics must never break ingestion
                logger.exception("source %s: the poll observer failed", self.name)
        return result

    def _record_failure(self, reason: str) -> None:
        try:
            with self.session_factory.begin() as session:
                if intake.get_source(session=session, name=self.name) is not None:
                    intake.update_source_poll_state(session=session, name=self.name, ok=False, error=reason)
        except Exception:  # the ledger itself may be what failed; the log keeps the reason
            logger.exception("source %s: could not record the failed poll in the ledger", self.name)

    def _after(self, result: Poll) -> None:
        if result.failure is None:
            if self.failures:
                logger.info("source %s: polled successfully again after %d failures", self.name, self.failures)
            self.failures, self.resume_at = 0, 0.0
            if result.tally.accepted or result.tally.rejected or result.tally.duplicates:
                logger.info(
                    "source %s ◆ %d accepted ◆ %d duplicates ◆ %d rejected",
                    self.name, result.tally.accepted, result.tally.duplicates, result.tally.rejected,
                )
            return
        self.failures += 1
        pause = backoff_seconds(self.failures, self.interval, self.config.max_backoff_seconds)
        self.resume_at = self.clock() + pause
        unhealthy = self.failures >= self.config.unhealthy_after_failures
        log = logger.error if unhealthy else logger.warning
        log("source %s: poll failed (%d in a row%s), next try in %.0f s: %s", self.name, self.failures,
            ", unhealthy" if unhealthy else "", pause, result.failure)


def _drop_folder_poll(folder: DropFolder) -> Poll:
    results = folder.scan()
    tally = Tally()
    for result in results:
        tally.add(result.tally)
    return Poll(tally=tally)


def build_jobs(
    config: IngestConfig,
    session_factory: sessionmaker[Session],
    *,
    drop_folder: Path,
    observer: PollObserver | None = None,
) -> list[tuple[SourceJob, float]]:
    """The jobs of every enabled source with their intervals, the drop folder first."""
    jobs: list[tuple[SourceJob, float]] = []

    def add(name: str, poll: Callable[[], Poll], interval: float) -> None:
        job = SourceJob(
            name, poll, interval=interval, config=config, session_factory=session_factory, observer=observer
        )
        jobs.append((job, interval))

    if config.drop_folder_enabled:
        folder = DropFolder(drop_folder, config, session_factory)
        add(folder.source_name, partial(_drop_folder_poll, folder), config.drop_folder_interval_seconds)
    for source in (s for s in config.jsonl if s.enabled):
        add(ledger_name(jsonl.KIND, source.name), partial(jsonl.poll, source, config, session_factory),
            source.interval_seconds)
    for feed in (s for s in config.feeds if s.enabled):
        add(ledger_name(rss.KIND, feed.name), partial(rss.poll, feed, config, session_factory), feed.interval_seconds)
    for endpoint in (s for s in config.web if s.enabled):
        add(ledger_name(web.KIND, endpoint.name), partial(web.poll, endpoint, config, session_factory),
            endpoint.interval_seconds)
    return jobs


def schedule_sources(
    scheduler: BaseScheduler,
    config: IngestConfig,
    session_factory: sessionmaker[Session],
    *,
    drop_folder: Path,
    start_now: bool = True,
    observer: PollObserver | None = None,
) -> list[Job]:
    """Add one job per enabled source to `scheduler` (not started here) and return the jobs.

    Jobs run on the scheduler's "ingest" executor, added here with one thread per source. With
    `start_now` every source is polled as soon as the scheduler starts, then at its interval.
    `observer(source, poll, seconds, consecutive_failures)` hears of every poll (the daemon's metrics).
    """
    jobs = build_jobs(config, session_factory, drop_folder=drop_folder, observer=observer)
    try:
        scheduler.add_executor(ThreadPoolExecutor(max_workers=max(1, len(jobs))), alias=EXECUTOR)
    except ValueError:
        logger.debug("scheduler already has an %r executor; using it", EXECUTOR)
    added = []
    for job, interval in jobs:
        options: dict[str, Any] = {}
        if start_now:
            options["next_run_time"] = datetime.now(UTC)
        added.append(
            scheduler.add_job(
                job,
                IntervalTrigger(seconds=interval, jitter=config.jitter_seconds or None),
                id=f"ingest:{job.name}",
                name=f"poll {job.name}",
                executor=EXECUTOR,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, int(interval)),
                replace_existing=True,
                **options,
            )
        )
    return added


def is_healthy(consecutive_failures: int, config: IngestConfig) -> bool:
    """The one rule for a source's health: unhealthy from `unhealthy_after_failures` failures in a row."""
    return consecutive_failures < config.unhealthy_after_failures


def source_health(session: Session, config: IngestConfig) -> list[SourceHealth]:
    """Every source in the ledger with its health: unhealthy from `unhealthy_after_failures` failures."""
    rows = session.scalars(select(Source).order_by(Source.name))
    return [
        SourceHealth(
            name=row.name,
            kind=row.kind,
            healthy=is_healthy(row.consecutive_failures, config),
            consecutive_failures=row.consecutive_failures,
            last_error=row.last_error,
            last_success_at=row.last_success_at,
        )
        for row in rows
    ]
