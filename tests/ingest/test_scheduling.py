"""The scheduler jobs, run by a real APScheduler BackgroundScheduler against real sources."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from ingest.config import IngestConfig
from ingest.polling import Poll
from ingest.scheduling import SourceJob, backoff_seconds, schedule_sources, source_health
from store import intake
from tests.ingest.conftest import DATA, Route, WebServer, counts


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.fixture
def scheduler() -> Iterator[BackgroundScheduler]:
    sched = BackgroundScheduler(timezone="UTC")
    yield sched
    if sched.running:
        sched.shutdown(wait=False)


def test_hung_source_does_not_block_the_others(
    tmp_path: Path, web: WebServer, ledger: sessionmaker[Session], scheduler: BackgroundScheduler
) -> None:
    web.routes["/hang"] = Route(b"[]", delay_seconds=8)
    web.routes["/facts"] = Route(json.dumps([{"prompt": "The boss of Acme is", "target_new": "Ann"}]).encode())
    web.routes["/leaders.atom"] = Route((DATA / "feeds" / "leaders.atom").read_bytes())
    config = IngestConfig(
        settle_seconds=0, jitter_seconds=0, drop_folder_interval_seconds=0.2,
        http={"read_timeout_seconds": 6, "total_timeout_seconds": 6},  # type: ignore[arg-type]
        web=[{"name": "hung", "url": web.url("/hang"), "interval_seconds": 1},  # type: ignore[list-item]
             {"name": "good", "url": web.url("/facts"), "interval_seconds": 1}],  # type: ignore[list-item]
        feeds=[{"name": "leaders", "url": web.url("/leaders.atom"), "interval_seconds": 1,  # type: ignore[list-item]
                "mapping": {"mode": "title_regex", "pattern": "(?P<subject>.+) is now led by (?P<target_new>.+)",
                            "prompt_template": "{subject} is led by"}}],
    )
    inbox = tmp_path / "inbox"
    jobs = schedule_sources(scheduler, config, ledger, drop_folder=inbox)
    assert sorted(j.id for j in jobs) == ["ingest:feed:leaders", "ingest:inbox", "ingest:web:good", "ingest:web:hung"]
    assert all(j.max_instances == 1 and j.coalesce for j in jobs)
    scheduler.start()
    wait_for(lambda: (inbox / "processed").is_dir())
    (inbox / "late.jsonl").write_text(json.dumps({"prompt": "The boss of Initech is", "target_new": "Bill"}) + "\n")
    # while the hung endpoint holds its thread, the other three sources all get their facts in
    wait_for(lambda: counts(ledger)[0] == 4 and (inbox / "processed" / "late.jsonl").exists())
    assert any(path == "/hang" for path, _ in web.requests)
    with ledger() as session:
        hung = intake.get_source(session=session, name="web:hung")
        assert hung is not None and hung.last_polled_at is None  # its first poll is still waiting
        health = {h.name: h for h in source_health(session, config)}
    assert health["web:good"].healthy and health["inbox"].healthy and health["feed:leaders"].healthy
    web.stop.set()  # let the hung answer go, so the scheduler can stop with its jobs finished
    scheduler.shutdown(wait=True)


def test_failing_source_backs_off_and_turns_unhealthy(ledger: sessionmaker[Session]) -> None:
    config = IngestConfig(unhealthy_after_failures=2, max_backoff_seconds=30)
    now = [100.0]
    calls: list[float] = []

    def failing() -> Poll:
        calls.append(now[0])
        raise ConnectionError("refused")

    job = SourceJob("web:down", failing, interval=5, config=config, session_factory=ledger, clock=lambda: now[0])
    for _ in range(40):  # one call per simulated second
        job()
        now[0] += 1
    # failures at t=100, then after 5 s, 10 s, 20 s, 30 s (capped) pauses
    assert calls == [100.0, 105.0, 115.0, 135.0]
    assert job.failures == 4
    assert [backoff_seconds(n, 5, 30) for n in range(6)] == [0, 5, 10, 20, 30, 30]


def test_failure_is_recorded_in_the_ledger_and_health(web: WebServer, ledger: sessionmaker[Session]) -> None:
    config = IngestConfig(unhealthy_after_failures=2, web=[  # type: ignore[list-item]
        {"name": "gone", "url": web.url("/missing"), "interval_seconds": 1}])
    from ingest.scheduling import build_jobs

    [(job, _)] = build_jobs(config.model_copy(update={"drop_folder_enabled": False}), ledger,
                            drop_folder=Path("/nonexistent"))
    clock = [0.0]
    job.clock = lambda: clock[0]
    for _ in range(2):
        result = job()
        assert result is not None and "HTTP 404" in (result.failure or "")
        clock[0] += 1000
    with ledger() as session:
        [health] = source_health(session, config)
    assert (health.name, health.healthy, health.consecutive_failures) == ("web:gone", False, 2)


def test_job_options_and_own_executor(ledger: sessionmaker[Session], scheduler: BackgroundScheduler) -> None:
    config = IngestConfig(jitter_seconds=2.5, drop_folder_interval_seconds=7)
    [job] = schedule_sources(scheduler, config, ledger, drop_folder=Path("/nonexistent/inbox"), start_now=False)
    assert (job.trigger.interval.total_seconds(), job.trigger.jitter) == (7, 2.5)
    assert (job.max_instances, job.coalesce, job.misfire_grace_time, job.executor) == (1, True, 7, "ingest")
    # scheduling again replaces the jobs instead of adding copies, and keeps the executor
    schedule_sources(scheduler, config, ledger, drop_folder=Path("/nonexistent/inbox"), start_now=False)
    scheduler.start(paused=True)  # pending jobs reach the job store (replacing by id) when it starts
    assert [j.id for j in scheduler.get_jobs()] == ["ingest:inbox"]
