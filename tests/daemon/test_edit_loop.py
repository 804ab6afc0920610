"""`daemon.edit_loop.EditLoop`: pending facts become gated, crash-safe commits; reverts, stops and drift.

Real parts throughout: a SQLite ledger and artefact store in a temporary state directory, a tiny Llama
loaded from a local Hugging Face directory (as the daemon loads `[model] source`), an untrained EMSEdit
editor, the real gate and checker. Gate thresholds are set per test to make the verdict certain on a
random tiny model (everything passes, or nothing does).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from daemon.config import EditLoopConfig
from daemon.edit_loop import EditLoop
from daemon.ledger_view import LedgerView
from daemon.metrics import Metrics
from daemon.model_state import open_history
from daemon.view import DaemonView
from editing.config import EditorConfig
from editing.engine.emsedit import EMSEditor
from editing.gate.checks import BatchMeasurement, GateFact
from editing.gate.config import GateConfig
from editing.gate.probes import DriftDecision
from editing.gate.specificity import FrozenBase, ReferenceStore
from store import commits, intake
from store.models import Commit, Fact, ProbeRun, Revert
from store.records import FactIn, Locality, Origin
from tests.daemon.test_model_state import World, tiny_model_dir_fixture, world_fixture, worlds_fixture

__all__ = ["tiny_model_dir_fixture", "world_fixture", "worlds_fixture"]

PASS_ALL = GateConfig(
    min_efficacy=0.0, min_agreement=0.0, max_kl=1e9, min_batch_agreement=0.0, max_batch_kl=1e9, specificity_prompts=4
)
FAIL_SPECIFICITY = GateConfig(
    min_efficacy=0.0, min_agreement=1.0, max_kl=1e-7, min_batch_agreement=1.0, max_batch_kl=1e-7, specificity_prompts=4
)
EDITOR = EditorConfig(batch_size=4, rank=8, n_blocks=1, lm_batch_size=4, edit_lr=0.05)


@dataclass
class Rig:
    world: World
    loop: EditLoop
    view: DaemonView
    metrics: Metrics
    registry: CollectorRegistry

    def add(self, count: int, start: int = 0) -> list[int]:
        with self.world.sessions.begin() as session:
            items = [
                (
                    FactIn(
                        prompt=f"The capital of country {i} is",
                        target_new=f"Paris {i}",
                        rephrase_prompts=(f"Country {i} has its capital in",),
                        locality=(Locality("Lionel Messi plays", "football"),),
                    ),
                    Origin("test", "facts.jsonl", str(i)),
                )
                for i in range(start, start + count)
            ]
            result = intake.add_facts(session=session, items=items)
        return list(result.fact_ids)

    def ids(self) -> list[int]:
        with self.world.sessions() as session:
            return list(session.scalars(select(Fact.id).order_by(Fact.id)))

    def statuses(self) -> dict[int, str]:
        return self.world.statuses()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


def make_rig(
    world: World,
    *,
    gate: GateConfig = PASS_ALL,
    edit_loop: EditLoopConfig | None = None,
    stop: threading.Event | None = None,
) -> Rig:
    settings = world.settings.model_copy(
        update={"gate": gate, "editor": EDITOR, "edit_loop": edit_loop or EditLoopConfig(min_batch=1, max_wait_seconds=0)}
    )
    loaded = world.load()
    names = list(settings.model.edit_modules or [])
    base = FrozenBase.capture(loaded.model, loaded.fingerprint, [f"{n}.weight" for n in names])
    references = ReferenceStore(base, settings.state_dir / "references")
    history, _ = open_history(settings, loaded, world.sessions)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    view = DaemonView(ledger=LedgerView(world.sessions, settings.ingest, metrics), sessions=world.sessions)
    view.model, view.weights = loaded, history.state
    loop = EditLoop(settings, world.sessions, history, loaded, references, metrics, view, stop or threading.Event())
    view.reverter = loop.revert
    editor = EMSEditor(loaded.model, loaded.tokenizer, names, settings.editor)
    loop.attach_editor(editor, "test-editor")
    return Rig(world, loop, view, metrics, registry)


def test_pending_facts_are_edited_committed_and_recorded(world: World) -> None:
    rig = make_rig(world)
    rig.add(6)
    rig.loop.tick()

    assert set(rig.statuses().values()) == {"committed"}
    with world.sessions() as session:
        rows = list(session.scalars(select(Commit).order_by(Commit.version)))
        gate_runs = list(session.scalars(select(ProbeRun).where(ProbeRun.kind == "gate")))
        baseline = list(session.scalars(select(ProbeRun).where(ProbeRun.kind == "baseline")))
    assert [r.version for r in rows] == [1, 2]  # batch_size 4: two batches
    assert [r.fact_count for r in rows] == [4, 2]
    assert rows[-1].weights_sha256 == rig.loop.history.state.weights_sha256()
    for row in rows:
        assert row.artefact_sha256 and row.model_fingerprint == rig.loop.loaded.fingerprint
        assert row.editor_version and row.editor_version.endswith("+test-editor")
        assert row.config_hash and len(row.config_hash) == 64
        assert row.package_versions["torch"] and row.seed == EDITOR.seed
        assert {"efficacy", "specificity_agreement", "edit_seconds", "gate_seconds"} <= set(row.edit_metrics)
        assert "generalization" in row.edit_metrics
    assert sorted(r.commit_version or 0 for r in gate_runs) == [1, 2] and all(r.passed for r in gate_runs)
    assert len(baseline) == 1
    assert rig.metric("ked_facts_committed_total") == 6
    assert rig.metric("ked_model_version") == 2
    assert rig.metric("ked_edit_batches_total", {"outcome": "committed"}) == 2


def test_a_restart_rebuilds_the_committed_weights_and_editor_state(world: World) -> None:
    rig = make_rig(world)
    rig.add(3)
    rig.loop.tick()
    expected = rig.loop.history.state.weights_sha256()
    editor_state = rig.loop.gated.editor.edit_state() if rig.loop.gated else {}

    again = make_rig(world)
    assert again.loop.history.state.version == 1
    assert again.loop.history.state.weights_sha256() == expected
    assert again.loop.gated is not None
    restored = again.loop.gated.editor.edit_state()
    assert set(restored) == set(editor_state)
    assert all(bool((restored[k] == editor_state[k]).all()) for k in editor_state)


def test_facts_harming_specificity_are_rejected_with_their_numbers(world: World) -> None:
    rig = make_rig(world, gate=FAIL_SPECIFICITY)
    before = rig.loop.history.state.weights_sha256()
    rig.add(2)
    rig.loop.tick()

    with world.sessions() as session:
        facts = list(session.scalars(select(Fact)))
        runs = list(session.scalars(select(ProbeRun).where(ProbeRun.kind == "gate")))
        assert commits.current_version(session) == 0
    assert {f.status.value for f in facts} == {"rejected"}
    assert all("specificity" in (f.last_error or "") and "agreement" in (f.last_error or "") for f in facts)
    assert len(runs) == 1 and runs[0].passed is False and runs[0].details["outcomes"]
    assert rig.loop.history.state.weights_sha256() == before
    assert rig.metric("ked_edit_batches_total", {"outcome": "rejected"}) == 1


def test_a_model_that_already_fails_the_gate_pauses_editing(world: World) -> None:
    first = make_rig(world)
    first.add(2)
    first.loop.tick()  # v1 differs from the base model
    rig = make_rig(world, gate=GateConfig(min_efficacy=0.0, min_agreement=0.0, max_kl=0.0, specificity_prompts=4))
    new = rig.add(2, start=60)
    rig.loop.tick()
    statuses = rig.statuses()
    assert {statuses[i] for i in new} == {"pending"}  # deferred, not rejected: the batch is not to blame
    assert rig.view.paused and "already fails specificity" in (rig.view.pause_reason or "")


def test_the_loop_waits_for_min_batch_or_the_oldest_facts_age(world: World) -> None:
    rig = make_rig(world, edit_loop=EditLoopConfig(min_batch=3, max_wait_seconds=3600))
    rig.add(2)
    rig.loop.tick()
    assert set(rig.statuses().values()) == {"pending"}
    rig.add(1, start=10)
    rig.loop.tick()
    assert set(rig.statuses().values()) == {"committed"}

    aged = make_rig(world, edit_loop=EditLoopConfig(min_batch=100, max_wait_seconds=0))
    aged.add(1, start=20)
    aged.loop.tick()
    assert set(aged.statuses().values()) == {"committed"}


def _on_measure(rig: Rig, action: Callable[[int], None]) -> None:
    """Call `action(n)` before the checker's n-th measurement (n from 1)."""
    assert rig.loop.gated is not None
    checker = rig.loop.gated.checker
    original = checker.measure
    calls = [0]

    def measure(
        model: Any, tokenizer: Any, facts: Sequence[GateFact], extra: Sequence[str] = (), frozen: Any = None
    ) -> BatchMeasurement:
        calls[0] += 1
        action(calls[0])
        return original(model, tokenizer, facts, extra, frozen)

    checker.measure = measure  # type: ignore[method-assign,assignment]


def test_a_stop_during_the_gate_rolls_the_batch_back(world: World) -> None:
    stop = threading.Event()
    # Isolation needs several tries, so a stop after the first one lands inside the batch.
    rig = make_rig(world, gate=FAIL_SPECIFICITY, stop=stop)
    before = rig.loop.history.state.weights_sha256()
    rig.add(4)
    _on_measure(rig, lambda n: stop.set() if n == 1 else None)
    rig.loop.tick()

    assert set(rig.statuses().values()) == {"pending"}
    with world.sessions() as session:
        assert all("stopped" in (f.last_error or "") for f in session.scalars(select(Fact)))
    assert rig.loop.history.state.weights_sha256() == before
    assert rig.metric("ked_edit_batches_total", {"outcome": "rolled_back"}) == 1


def test_a_revert_landing_mid_batch_abandons_the_commit_and_retries_on_the_new_version(world: World) -> None:
    rig = make_rig(world)
    rig.add(2)
    rig.loop.tick()  # v1
    v1_hash = rig.loop.history.state.weights_sha256()
    rig.add(2, start=50)

    def file_revert(n: int) -> None:
        if n == 1:  # the CLI files a revert to v0 while the batch is being gated
            with world.sessions.begin() as session:
                commits.revert_to(session=session, to_version=0, reason="test", requested_by="cli:test")

    _on_measure(rig, file_revert)
    report = rig.loop.run_batch()
    assert report.version is None and report.outcome == "rolled_back"
    assert rig.loop.history.state.weights_sha256() == v1_hash  # nothing published
    assert sorted(world.artefacts()) == sorted(a for a in world.artefacts() if "000002" not in a)

    _on_measure(rig, lambda n: None)
    rig.loop.tick()  # applies the revert, then edits the released facts on v0
    statuses = rig.statuses()
    assert sorted(statuses.values()) == ["committed", "committed", "reverted", "reverted"]
    with world.sessions() as session:
        assert all(r.weights_restored_at is not None for r in session.scalars(select(Revert)))
        newest = session.get(Commit, commits.current_version(session))
        assert newest is not None and newest.parent_version == 0
        assert newest.weights_sha256 == rig.loop.history.state.weights_sha256()


def test_api_revert_restores_the_recorded_weights(world: World) -> None:
    rig = make_rig(world)
    rig.add(2)
    rig.loop.tick()
    v1 = world.recorded_hash(1)
    rig.add(2, start=30)
    rig.loop.tick()
    assert rig.loop.history.state.version == 2

    result = rig.view.request_revert(to_version=None, last=1, reason="bad facts", requested_by="api:test")
    assert result.weights_restored and result.to_version == 1 and result.reverted_facts == 2
    assert rig.loop.history.state.weights_sha256() == v1
    assert rig.metric("ked_reverts_total", {"outcome": "done"}) == 1
    assert rig.metric("ked_model_version") == 1


def test_a_revert_filed_in_the_ledger_is_applied_by_the_next_pass(world: World) -> None:
    rig = make_rig(world)
    rig.add(2)
    rig.loop.tick()
    with world.sessions.begin() as session:
        commits.revert_to(session=session, to_version=0, reason="cli", requested_by="cli:test")
    rig.loop.tick()
    assert rig.loop.history.state.version == 0
    assert rig.loop.history.state.weights_sha256() == world.recorded_hash(0)
    with world.sessions() as session:
        assert [r.weights_restored_at is not None for r in session.scalars(select(Revert))] == [True]


def test_drift_pauses_editing_across_a_restart_until_a_revert(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = PASS_ALL.model_copy(update={"probe_every_commits": 1, "drift_policy": "pause"})
    rig = make_rig(world, gate=gate)
    monkeypatch.setattr(rig.loop.drift, "decide", lambda report: DriftDecision("pause", ("flip rate too high",)))
    rig.add(1)
    rig.loop.tick()
    assert rig.view.paused and "flip rate too high" in (rig.view.pause_reason or "")
    assert any("editing paused" in r for r in rig.view.readiness())
    assert rig.metric("ked_editing_paused") == 1
    rig.add(1, start=40)
    rig.loop.tick()
    assert sorted(rig.statuses().values()) == ["committed", "pending"]

    again = make_rig(world, gate=gate)
    assert again.view.paused  # the failed probe run on the live version survives the restart

    again.view.request_revert(to_version=0, last=None, reason="drift", requested_by="api:test")
    assert not again.view.paused
    assert again.metric("ked_editing_paused") == 0


def test_drift_with_the_revert_policy_goes_back_to_the_last_passing_version(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = PASS_ALL.model_copy(update={"probe_every_commits": 1, "drift_policy": "revert"})
    rig = make_rig(world, gate=gate)
    monkeypatch.setattr(rig.loop.drift, "decide", lambda report: DriftDecision("revert", ("accuracy dropped",)))
    rig.add(1)
    rig.loop.tick()
    assert rig.loop.history.state.version == 0  # the baseline (version 0) is the last run that passed
    assert rig.loop.history.state.weights_sha256() == world.recorded_hash(0)
    with world.sessions() as session:
        audit = session.scalars(select(Revert)).one()
    assert audit.requested_by == "daemon:drift" and "accuracy dropped" in (audit.reason or "")
    assert not rig.view.paused


def test_a_fact_retried_after_failing_efficacy_gets_a_stronger_edit_signal(world: World) -> None:
    # min_efficacy above 1 (model_copy skips validation): every try fails efficacy, whatever the tiny model does
    rig = make_rig(world, gate=PASS_ALL.model_copy(update={"min_efficacy": 1.01, "efficacy_retries": 2}))
    assert rig.loop.gated is not None
    editor = rig.loop.gated.editor
    seen: list[list[float] | None] = []
    original = editor.propose

    def recording(examples: Any, masters: Any = None, *, strengths: Any = None) -> Any:
        seen.append(list(strengths) if strengths is not None else None)
        return original(examples, masters, strengths=strengths)

    editor.propose = recording  # type: ignore[method-assign]
    (fact,) = rig.add(1)
    for _ in range(3):
        rig.loop.tick()
    assert seen == [None, [2.0], [4.0]]  # retry_strength 2, once per failed try
    assert rig.statuses()[fact] == "failed"
