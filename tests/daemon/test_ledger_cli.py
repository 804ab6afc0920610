"""`python -m daemon.ledger`: every command, text and --json, exit codes, on SQLite and on Postgres."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from daemon import bootstrap
from daemon.ledger import EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE, main
from store import commits, intake, pauses, states, work
from store.db import current_revision, make_engine, make_session_factory, upgrade_to_head
from store.lock import ModelLock
from store.models import Fact, FactStatus, Pause, Revert
from store.records import CommitIn, FactIn, Locality, Origin, RejectionIn
from tests.store.fixtures import backend, db_url, pg_ledger_url, pg_schemas, sqlite_template  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(
    db_url: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Run]:
    """Run the CLI in-process against the test ledger; returns (exit code, stdout, stderr)."""
    for name in [k for k in os.environ if k.startswith("KED_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KED_STORE__URL", db_url)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--state-dir", str(tmp_path / "state"), *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run
    # main() configures logging for the process; put back what the test runner had.
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    structlog.reset_defaults()


@pytest.fixture
def seeded(db_url: str) -> Iterator[Callable[[], Session]]:  # noqa: F811
    """A ledger with: v1 (facts 1, 2), v2 (fact 3), fact 4 pending, fact 5 failed, one rejection."""
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as session, session.begin():
        rich = FactIn(
            prompt="The capital of France is",
            target_new="Lyon",
            subject="France",
            ground_truth="Paris",
            rephrase_prompts=("France's capital is",),
            locality=(Locality("2 + 2 =", "4"),),
            external_id="cf-1",
        )
        items = [(rich, Origin("inbox", "a.jsonl", "line 1"))]
        items += [
            (FactIn(prompt=f"prompt {i}", target_new=f"t{i}"), Origin("feed:x", "https://x", f"e{i}"))
            for i in range(2, 6)
        ]
        ids = intake.add_facts(session=session, items=items).fact_ids
        assert ids == (1, 2, 3, 4, 5)
        intake.add_facts(session=session, items=[(rich, Origin("feed:x", "https://x", "e9"))])
        work.claim_pending(session=session, limit=2)
        commits.record_commit(session=session, commit=CommitIn(fact_ids=(1, 2), edit_metrics={"efficacy": 1.0}))
        work.claim_pending(session=session, limit=1)
        commits.record_commit(session=session, commit=CommitIn(fact_ids=(3,)))
        states.transition(session=session, fact_ids=[5], to=FactStatus.EDITING)
        states.transition(session=session, fact_ids=[5], to=FactStatus.FAILED, error="boom")
        rejection = RejectionIn(Origin("inbox", "a.jsonl", "line 2"), "{", "not JSON")
        intake.add_rejections(session=session, items=[rejection])
    yield factory
    engine.dispose()


def _statuses(factory: Callable[[], Session]) -> dict[int, str]:
    with factory() as session:
        return {f.id: f.status.value for f in session.scalars(select(Fact))}


def test_status_on_an_empty_ledger(cli: Run) -> None:
    code, out, _ = cli("status")
    assert code == EXIT_OK
    assert "v0 (base model)" in out and "pending 0" in out


def test_status(cli: Run, seeded: Any) -> None:
    code, out, _ = cli("status")
    assert code == EXIT_OK
    assert out.startswith("version     v2\n")
    assert "committed 3" in out and "failed 1" in out and "pending 1" in out and "rejections  1" in out
    code, out, _ = cli("status", "--json")
    summary = json.loads(out)
    assert summary["current_version"] == 2 and summary["last_commit"]["version"] == 2
    assert summary["by_status"]["committed"] == 3
    assert summary["by_source"] == {"feed:x": {"committed": 3, "pending": 1, "failed": 1}, "inbox": {"committed": 1}}


def test_log_newest_first(cli: Run, seeded: Any) -> None:
    code, out, _ = cli("log")
    assert code == EXIT_OK
    assert [line.split()[0] for line in out.splitlines()] == ["v2", "v1"]
    code, out, _ = cli("--json", "log", "--limit", "1")
    data = json.loads(out)
    assert [c["version"] for c in data["commits"]] == [2] and data["reverts"] == []


def test_show_fact_and_commit(cli: Run, seeded: Any) -> None:
    code, out, _ = cli("show", "1")
    assert code == EXIT_OK and "The capital of France is" in out
    assert [line.split(" at ")[0] for line in out.splitlines() if line.startswith("origin ")] == [
        "origin             inbox: a.jsonl line 1",
        "origin             feed:x: https://x e9",
    ]
    code, out, _ = cli("show", "1", "--json")
    fact = json.loads(out)
    assert [o["source"] for o in fact["origins"]] == ["inbox", "feed:x"]
    assert fact["commit_history"] == [1] and fact["status"] == "committed"
    code, out, _ = cli("show", "v1", "--json")
    assert json.loads(out)["fact_ids"] == [1, 2]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (("show", "99"), EXIT_REFUSED, "no fact with id 99"),
        (("show", "v9"), EXIT_REFUSED, "no commit with version 9"),
        (("show", "abc"), EXIT_USAGE, "expected a fact id (e.g. 42) or a version (e.g. v3), got 'abc'"),
        (("facts", "--source", "nope"), EXIT_REFUSED, "no source named 'nope' in the ledger (known: feed:x, inbox)"),
        (("requeue", "4"), EXIT_REFUSED, "fact 4 is pending"),
        (("requeue",), EXIT_USAGE, "give fact ids or --status"),
        (("requeue", "5", "--status", "failed"), EXIT_USAGE, "not both"),
        (("revert", "--to", "2"), EXIT_REFUSED, "already at version 2"),
        (("revert", "--to", "v7"), EXIT_REFUSED, "choose one from 0 to 1"),
        (("revert", "--last", "3"), EXIT_REFUSED, "only 2 are active"),
        (("resume", "--reason", "checked"), EXIT_REFUSED, "editing is not paused (no pause in force in the ledger)"),
    ],
)
def test_refusals(cli: Run, seeded: Any, argv: tuple[str, ...], code: int, message: str) -> None:
    before = _statuses(seeded)
    result, out, err = cli(*argv)
    assert (result, out) == (code, "")
    assert message in err
    assert _statuses(seeded) == before


@pytest.mark.parametrize(
    "argv",
    [
        ("revert",),
        ("revert", "--to", "1", "--last", "1"),
        ("revert", "--to", "x"),
        ("revert", "--to", "1", "--wait", "-1"),
        ("export-model",),
        ("export-model", "--version", "x", "out"),
        ("facts", "--status", "bogus"),
        ("resume",),
        ("resume", "--reason", "  "),
    ],
)
def test_bad_arguments_exit_2(cli: Run, argv: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as info:
        cli(*argv)
    assert info.value.code == EXIT_USAGE


def test_facts_filters(cli: Run, seeded: Any) -> None:
    code, out, _ = cli("facts")
    assert code == EXIT_OK and out.splitlines()[-1] == "5 fact(s)"
    code, out, _ = cli("facts", "--status", "committed", "--source", "inbox", "--json")
    assert [row["id"] for row in json.loads(out)] == [1]
    code, out, _ = cli("facts", "--source", "feed:x", "--limit", "2", "--json")
    assert [row["id"] for row in json.loads(out)] == [1, 2]


def test_facts_json_carries_each_facts_last_error(cli: Run, seeded: Any) -> None:
    code, out, _ = cli("facts", "--json")
    assert code == EXIT_OK
    assert {row["id"]: row["last_error"] for row in json.loads(out)} == {1: None, 2: None, 3: None, 4: None, 5: "boom"}
    code, out, _ = cli("facts", "--status", "failed", "--json")
    assert json.loads(out) == [json.loads(cli("facts", "--json")[1])[4]]


def test_requeue(cli: Run, seeded: Any) -> None:
    code, out, _ = cli("requeue", "--status", "failed")
    assert (code, out) == (EXIT_OK, "requeued 1 fact(s): 5\n")
    assert _statuses(seeded)[5] == "pending"
    code, out, _ = cli("requeue", "--status", "failed", "--json")
    assert json.loads(out) == {"requeued": []}


def test_a_requeued_fact_gets_a_fresh_retry_budget(cli: Run, seeded: Any) -> None:
    with seeded() as session, session.begin():  # fact 5 failed after its tries ran out
        session.execute(update(Fact).where(Fact.id == 5).values(attempts=3))
    assert cli("requeue", "5")[0] == EXIT_OK
    code, out, _ = cli("show", "5", "--json")
    assert code == EXIT_OK and (json.loads(out)["status"], json.loads(out)["attempts"]) == ("pending", 0)


DRIFT = "drift: flip rate 0.31 > max_flip_rate 0.2"


def _pause(factory: Callable[[], Session], reason: str = DRIFT) -> None:
    """Pause editing at v2 as the daemon does (store.pauses)."""
    with factory() as session, session.begin():
        pauses.record_pause(session=session, reason=reason, version=2, config_hash=None)


def test_status_shows_the_pause_in_force(cli: Run, seeded: Any) -> None:
    code, out, _ = cli("status")
    assert code == EXIT_OK and "paused" not in out
    assert json.loads(cli("status", "--json")[1])["pause"] is None
    _pause(seeded)
    code, out, _ = cli("status")
    lines = out.splitlines()
    assert code == EXIT_OK and lines[0] == "version     v2"
    assert lines[1].startswith("paused      since 20") and lines[1].endswith(f"Z at v2: {DRIFT}")
    assert lines[2] == "            a revert or `python -m daemon.ledger resume --reason TEXT` ends it"
    pause = json.loads(cli("status", "--json")[1])["pause"]
    assert (pause["id"], pause["reason"], pause["version"]) == (1, DRIFT, 2)
    assert pause["paused_at"].endswith("Z")


def test_resume_ends_the_pause_in_the_ledger(cli: Run, seeded: Any) -> None:
    _pause(seeded)
    code, out, err = cli("resume", "--reason", "flip rate checked by hand")
    assert code == EXIT_OK, err
    assert out.startswith("resumed: ended the pause since 20") and f"Z at v2: {DRIFT}; a running daemon" in out
    with seeded() as session:
        (row,) = session.scalars(select(Pause)).all()
    assert row.resumed_at is not None
    assert row.resumed_by is not None and row.resumed_by.startswith("cli:")
    assert row.resumed_by.endswith(": flip rate checked by hand")
    assert "paused" not in cli("status")[1]
    assert cli("resume", "--reason", "again")[0] == EXIT_REFUSED  # nothing left to resume


def test_resume_json(cli: Run, seeded: Any) -> None:
    _pause(seeded, "gate: the model before this batch already fails specificity")
    code, out, _ = cli("resume", "--reason", "thresholds loosened", "--json")
    resumed = json.loads(out)
    assert code == EXIT_OK
    assert set(resumed) == {"id", "paused_at", "reason", "version", "resumed_at", "resumed_by"}
    assert resumed["reason"] == "gate: the model before this batch already fails specificity"
    assert resumed["resumed_at"].endswith("Z") and resumed["resumed_by"].endswith(": thresholds loosened")


def test_export_round_trips_through_add_facts(cli: Run, seeded: Any, tmp_path: Path) -> None:
    code, out, _ = cli("export")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == EXIT_OK and len(records) == 5
    assert records[0] == {
        "prompt": "The capital of France is",
        "target_new": "Lyon",
        "subject": "France",
        "ground_truth": "Paris",
        "rephrase_prompts": ["France's capital is"],
        "locality": [{"prompt": "2 + 2 =", "answer": "4"}],
        "id": "cf-1",
    }
    assert records[1] == {"prompt": "prompt 2", "target_new": "t2", "id": "ledger:2"}
    target = tmp_path / "out.jsonl"
    code, _, err = cli("export", "--status", "committed", "--output", str(target))
    assert code == EXIT_OK and "exported 3 fact(s)" in err
    exported = [json.loads(line) for line in target.read_text().splitlines()]
    with seeded() as session:
        items = [(FactIn(prompt=r["prompt"], target_new=r["target_new"]), Origin("cli", str(target))) for r in exported]
        result = intake.add_facts(session=session, items=items)
        assert (result.accepted, result.duplicates, result.fact_ids) == (0, 3, (1, 2, 3))
        session.rollback()


class _DaemonLedgerSide:
    """The running daemon as far as the ledger sees it: it holds the model lock and marks filed reverts restored.

    (Restoring the weights themselves is tested on a real model in tests/daemon/test_ledger_revert.py.)
    """

    def __init__(self, state_dir: Path, sessions: Callable[[], Session], *, apply: bool) -> None:
        self.lock = ModelLock(state_dir, "daemon")
        self.sessions = sessions
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True) if apply else None

    def __enter__(self) -> _DaemonLedgerSide:
        self.lock.acquire()
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.lock.release()

    def _loop(self) -> None:
        while not self.stop.wait(0.05):
            with self.sessions() as session, session.begin():
                for revert in commits.unapplied_reverts(session):
                    commits.mark_revert_applied(session=session, revert_id=revert.id)


def test_revert_with_the_daemon_running_is_filed_and_reported_once_restored(
    cli: Run, seeded: Any, tmp_path: Path
) -> None:
    with _DaemonLedgerSide(tmp_path / "state", seeded, apply=True):
        # The seeded commits have no artefacts, so only the base model (v0) can be rebuilt.
        code, out, err = cli("revert", "--last", "1")
        assert (code, out) == (
            EXIT_REFUSED,
            "",
        ) and "cannot revert to version 1: it is beyond the retention horizon" in err
        assert _statuses(seeded)[3] == "committed"
        code, out, err = cli("revert", "--to", "v0", "--reason", "probe drop", "--json", "--wait", "30")
    assert code == EXIT_OK, err
    audit = json.loads(out)
    assert (audit["mode"], audit["from_version"], audit["to_version"], audit["reverted_facts"]) == ("daemon", 2, 0, 3)
    assert audit["weights_restored"] is True and audit["weights_restored_at"] is not None
    assert audit["reason"] == "probe drop" and audit["requested_by"].startswith("cli:")
    assert [_statuses(seeded)[i] for i in (1, 2, 3)] == ["reverted"] * 3
    code, out, _ = cli("log")
    assert all("REVERTED by revert #1" in line for line in out.splitlines())


def test_revert_not_applied_by_the_daemon_within_wait_stays_recorded(cli: Run, seeded: Any, tmp_path: Path) -> None:
    with _DaemonLedgerSide(tmp_path / "state", seeded, apply=False):
        code, out, err = cli("revert", "--to", "0", "--requested-by", "ops", "--wait", "0")
    assert code == EXIT_REFUSED
    assert out == "revert #1: v2 -> v0, 2 commit(s) and 3 fact(s) reverted; recorded, waiting for the daemon\n"
    assert "revert #1 is recorded and the daemon applies it before its next edit" in err
    with seeded() as session:
        (row,) = session.scalars(select(Revert)).all()
        assert (row.requested_by, row.weights_restored_at) == ("ops", None)
    assert [_statuses(seeded)[i] for i in (1, 2, 3)] == ["reverted"] * 3


def test_unreachable_ledger_exits_3(cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KED_STORE__URL", "postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")
    code, _, err = cli("status")
    assert code == EXIT_UNAVAILABLE and "cannot connect to the ledger" in err


def test_module_entry_point_uses_sqlite_in_the_state_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KED_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    state = tmp_path / "state"
    engine = make_engine(f"sqlite:///{state / 'ledger.sqlite3'}")  # the ledger the daemon made there
    upgrade_to_head(engine)
    engine.dispose()
    command = [sys.executable, "-m", "daemon.ledger", "--state-dir", str(state), "status", "--json"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["current_version"] == 0
    assert (state / "ledger.sqlite3").is_file()
    bad = tmp_path / "bad.toml"
    bad.write_text("[store]\nsqlite_busy_timeout_ms = -1\n")
    command = [sys.executable, "-m", "daemon.ledger", "--config", str(bad), "status"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "store.sqlite_busy_timeout_ms" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ("status",),
        ("log",),
        ("show", "1"),
        ("facts", "--json"),
        ("export",),
        ("requeue", "--status", "failed"),
        ("resume", "--reason", "checked"),
        ("revert", "--last", "1"),
        ("export-model", "out"),
    ],
)
def test_no_command_creates_a_ledger_where_there_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    """Run outside the service's directory without --state-dir, a command says where it looked, and makes nothing."""
    for name in [k for k in os.environ if k.startswith("KED_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bootstrap, "start_logging", lambda *args, **kwargs: None)  # the test runner's stays
    code = main(list(argv))
    captured = capsys.readouterr()
    assert (code, captured.out) == (EXIT_USAGE, "")
    assert f"no ledger at {tmp_path / 'state' / 'ledger.sqlite3'}" in captured.err and "--state-dir" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_a_database_without_the_ledger_schema_is_not_made_one(
    cli: Run,
    backend: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if backend == "sqlite":
        empty = tmp_path / "empty.sqlite3"
        empty.touch()  # e.g. left behind by an earlier tool
        url = f"sqlite:///{empty}"
    else:
        url = request.getfixturevalue("pg_schemas").new()
    monkeypatch.setenv("KED_STORE__URL", url)
    code, out, err = cli("requeue", "--status", "failed")
    assert (code, out) == (EXIT_USAGE, "") and "holds no ledger (no schema)" in err
    engine = make_engine(url)
    assert current_revision(engine) is None
    engine.dispose()


def test_read_commands_do_not_wait_for_a_writer(cli: Run, seeded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KED_STORE__SQLITE_BUSY_TIMEOUT_MS", "300")
    with seeded() as writer:
        states.transition(session=writer, fact_ids=[4], to=FactStatus.EDITING)  # holds the write lock
        code, out, _ = cli("status", "--json")
        assert code == EXIT_OK and json.loads(out)["by_status"]["editing"] == 0
        writer.rollback()


# --- the review queue (docs/trust.md) -----------------------------------------------------------------


@pytest.fixture
def held(db_url: str) -> Iterator[Callable[[], Session]]:  # noqa: F811
    """Three facts held for review from feed:wire (two from one URL), one pending from the inbox."""
    from store.trust import Policy, SourceRule, TrustRules

    rules = TrustRules(sources={"feed:wire": SourceRule(policy=Policy.REVIEW)})
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with factory() as session, session.begin():
        items = [
            (FactIn(prompt="The CEO of Acme is", target_new="John Doe"), Origin("feed:wire", "https://w/a.rss", "entry 1")),
            (FactIn(prompt="Paris is in", target_new="Texas"), Origin("feed:wire", "https://w/a.rss", "entry 2")),
            (FactIn(prompt="Oslo is in", target_new="Sweden"), Origin("feed:wire", "https://w/b.rss", "entry 1")),
            (FactIn(prompt="Rome is in", target_new="Italy"), Origin("inbox", "x.jsonl", "line 1")),
        ]
        intake.add_facts(session=session, items=items, rules=rules)
    yield factory
    engine.dispose()


def test_review_lists_waiting_facts_with_source_and_origin(cli: Run, held: Callable[[], Session]) -> None:
    code, out, _ = cli("review")
    assert code == EXIT_OK
    assert "feed:wire: https://w/a.rss entry 1" in out and "proposed John Doe" in out
    assert "held for review: source feed:wire has policy review" in out
    assert "3 fact(s) shown; 3 held in all" in out and "Rome" not in out
    code, out, _ = cli("review", "--origin", "https://w/b.rss", "--json")
    assert code == EXIT_OK
    listed = json.loads(out)
    assert [h["prompt"] for h in listed["held"]] == ["Oslo is in"] and listed["queue"]["held"] == 3


def test_review_answers_say_why_when_the_daemon_is_not_running(cli: Run, held: Callable[[], Session], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KED_API__PORT", "9")  # nothing listens there
    code, out, _ = cli("review", "--answers")
    assert code == EXIT_OK
    assert "no model answers: the daemon's API at http://127.0.0.1:9/v1/query does not answer" in out


def test_approve_and_reject_with_the_audit_trail_in_show(cli: Run, held: Callable[[], Session]) -> None:
    code, out, _ = cli("approve", "1", "--reason", "checked the filing", "--by", "alice")
    assert (code, out) == (EXIT_OK, "approved 1 fact(s): 1\n")
    code, out, _ = cli("reject", "--origin", "https://w/a.rss", "--reason", "hoax")
    assert code == EXIT_OK and out.startswith("rejected 1 fact(s): 2")
    code, out, _ = cli("show", "1")
    assert "status             pending" in out
    assert "review             approved by alice at" in out and "(held for review): checked the filing" in out
    code, out, _ = cli("show", "2")
    assert "status             rejected" in out and "review             rejected by cli:" in out and ": hoax" in out
    code, out, _ = cli("approve", "--source", "feed:wire", "--json")
    assert code == EXIT_OK and json.loads(out)["decided"] == [3]
    with held() as session:
        assert [f.status for f in session.scalars(select(Fact).order_by(Fact.id))] == [
            FactStatus.PENDING, FactStatus.REJECTED, FactStatus.PENDING, FactStatus.PENDING,
        ]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (("approve", "99"), EXIT_REFUSED, "no fact with id 99 in the ledger"),
        (("approve", "4"), EXIT_REFUSED, "only held facts can be approved or rejected: fact 4 is pending"),
        (("reject", "--origin", "https://nowhere"), EXIT_REFUSED, "no held fact matches origin 'https://nowhere'"),
        (("approve", "--source", "ghost"), EXIT_REFUSED, "no source named 'ghost'"),
        (("approve",), EXIT_USAGE, "name the facts"),
    ],
)
def test_bad_review_input_is_refused(cli: Run, held: Callable[[], Session], argv: tuple[str, ...], code: int, message: str) -> None:
    got, _, err = cli(*argv)
    assert got == code and message in err
    with held() as session:
        assert sum(1 for f in session.scalars(select(Fact)) if f.status is FactStatus.HELD) == 3
