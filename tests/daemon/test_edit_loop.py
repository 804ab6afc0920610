"""`daemon.edit_loop.EditLoop`: pending facts become gated, crash-safe commits; reverts, stops and drift.

Real parts throughout: a SQLite ledger and artefact store in a temporary state directory, a tiny Llama
loaded from a local Hugging Face directory (as the daemon loads `[model] source`), an untrained EMSEdit
editor, the real gate and checker, the service's `ServiceState` watched by the metrics. Gate thresholds
are set per test to make the verdict certain on a random tiny model (everything passes, or nothing does).
A second `make_rig` on the same world is a restart of the daemon.
"""

from __future__ import annotations

import threading
import time
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
from daemon.service_state import EditorState, ServiceState
from daemon.view import DaemonView
from editing.config import EditorConfig
from editing.engine.emsedit import EMSEditor
from editing.gate.checks import BatchMeasurement, GateFact
from editing.gate.config import GateConfig
from editing.gate.probes import DriftDecision
from editing.gate.specificity import FrozenBase, ReferenceStore
from store import commits, intake, queries
from store import pauses as ledger_pauses
from store.models import Commit, Fact, Pause, ProbeRun, Revert
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

    @property
    def state(self) -> ServiceState:
        return self.view.state

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
    editor: EditorConfig = EDITOR,
) -> Rig:
    settings = world.settings.model_copy(
        update={"gate": gate, "editor": editor, "edit_loop": edit_loop or EditLoopConfig(min_batch=1, max_wait_seconds=0)}
    )
    loaded = world.load()
    names = list(settings.model.edit_modules or [])
    base = FrozenBase.capture(loaded.model, loaded.fingerprint, [f"{n}.weight" for n in names])
    references = ReferenceStore(base, settings.state_dir / "references")
    history, _ = open_history(settings, loaded, world.sessions)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    state = ServiceState()
    view = DaemonView(ledger=LedgerView(world.sessions, settings.ingest, metrics), sessions=world.sessions, state=state)
    metrics.watch(state, view.readiness)
    view.model, view.weights = loaded, history.state
    loop = EditLoop(settings, world.sessions, history, loaded, references, metrics, state, stop or threading.Event())
    view.reverter = loop.revert
    editor = EMSEditor(loaded.model, loaded.tokenizer, names, settings.editor)
    loop.attach_editor(editor, "test-editor")
    state.set_editor(EditorState.READY)  # as the service does once the editor is attached
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
    assert "already fails specificity" in (rig.view.pause_reason() or "")


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
    assert "flip rate too high" in (rig.view.pause_reason() or "")
    # Deliberate change (issue 23, item 6): a pause is no readiness reason any more (it made /readyz answer 503
    # although queries were still answered); the pause shows in the metrics and the status instead.
    assert not any("paused" in r for r in rig.view.readiness())
    assert rig.view.status().paused
    assert rig.metric("ked_editing_paused") == 1
    rig.add(1, start=40)
    rig.loop.tick()
    assert sorted(rig.statuses().values()) == ["committed", "pending"]

    again = make_rig(world, gate=gate)
    assert again.state.now().paused  # the pause recorded in the ledger survives the restart
    assert again.metric("ked_editing_paused") == 1

    again.view.request_revert(to_version=0, last=None, reason="drift", requested_by="api:test")
    assert not again.state.now().paused
    assert again.metric("ked_editing_paused") == 0
    assert not make_rig(world, gate=gate).state.now().paused  # and the revert ended it for good


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
    assert not rig.state.now().paused


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


BLOCKING = GateConfig(min_efficacy=0.0, min_agreement=0.0, max_kl=0.0, specificity_prompts=4)
#: A restart whose edit loop does not edit (reverts only), so that a test sees the state it starts in.
IDLE = EditLoopConfig(enabled=False)


def paused_by_the_gate(world: World) -> Rig:
    """v1 committed, then a gate that finds the live model beyond its budget: editing paused."""
    first = make_rig(world)
    first.add(2)
    first.loop.tick()
    rig = make_rig(world, gate=BLOCKING)
    rig.add(2, start=60)
    rig.loop.tick()
    assert "already fails specificity" in (rig.view.pause_reason() or "")
    return rig


def pauses(world: World) -> list[tuple[str, str | None]]:
    with world.sessions() as session:
        return [(p.reason, p.resumed_by) for p in session.scalars(select(Pause).order_by(Pause.id))]


def test_a_pause_survives_a_restart_until_a_revert_filed_with_the_cli(world: World) -> None:
    paused_by_the_gate(world)
    # A restart used to lift the pause silently, until the next batch blocked again.
    again = make_rig(world, gate=BLOCKING, edit_loop=IDLE)
    assert "already fails specificity" in (again.view.pause_reason() or "")
    assert again.metric("ked_editing_paused") == 1
    assert again.view.readiness() == []  # paused, but ready: queries are answered

    with world.sessions.begin() as session:
        revert = commits.revert_to(session=session, to_version=0, reason="cli", requested_by="cli:test")
    again.loop.tick()  # applies the revert: the operator's answer
    assert not again.state.now().paused
    assert [by for _, by in pauses(world)] == [f"revert {revert.id}"]
    assert not make_rig(world, gate=BLOCKING, edit_loop=IDLE).state.now().paused


def test_a_pause_ended_in_the_ledger_ends_at_the_next_pass(world: World) -> None:
    paused_by_the_gate(world)
    rig = make_rig(world, gate=BLOCKING, edit_loop=IDLE)
    with world.sessions.begin() as session:  # as an operator's resume command would
        ledger_pauses.record_resume(session=session, resumed_by="cli:operator")
    assert rig.state.now().paused
    rig.loop.tick()
    assert not rig.state.now().paused
    assert rig.metric("ked_editing_paused") == 0
    assert [by for _, by in pauses(world)] == ["cli:operator"]


def test_a_revert_filed_while_the_daemon_was_stopped_ends_the_pause_at_the_next_start(world: World) -> None:
    paused_by_the_gate(world)
    with world.sessions.begin() as session:
        revert = commits.revert_to(session=session, to_version=0, reason="cli", requested_by="cli:test")
    again = make_rig(world, gate=BLOCKING, edit_loop=IDLE)
    assert not again.state.now().paused
    assert [by for _, by in pauses(world)] == [f"revert {revert.id}"]


def test_a_start_with_other_gate_settings_ends_the_pause(world: World) -> None:
    paused_by_the_gate(world)
    loosened = make_rig(world, gate=BLOCKING.model_copy(update={"max_kl": 1e9}), edit_loop=IDLE)
    assert not loosened.state.now().paused
    assert loosened.metric("ked_editing_paused") == 0
    assert [by for _, by in pauses(world)] == ["a start with other model, editor or gate settings"]


def _fact(world: World, fact_id: int) -> tuple[str | None, str | None]:
    with world.sessions() as session:
        detail = queries.fact_detail(session, fact_id)
        (row,) = [r for r in queries.find_facts(session) if r.id == fact_id]
    assert (row.failure_cause, row.last_error) == (detail.failure_cause, detail.last_error)
    return detail.failure_cause, detail.last_error


@pytest.mark.parametrize(
    ("gate", "cause", "error"),
    [
        (PASS_ALL.model_copy(update={"min_efficacy": 1.01, "efficacy_retries": 0}), "efficacy", "< min_efficacy"),
        (FAIL_SPECIFICITY.model_copy(update={"isolate_harmful": False, "efficacy_retries": 0}), "specificity", "batch fails"),
        (PASS_ALL, "error", "the edit raised RuntimeError: out of memory"),
    ],
    ids=["missed-efficacy", "no-room-for-specificity", "the-edit-raised"],
)
def test_a_failed_fact_records_which_check_failed_it(world: World, gate: GateConfig, cause: str, error: str) -> None:
    rig = make_rig(world, gate=gate)
    if cause == "error":
        assert rig.loop.gated is not None

        def explode(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("out of memory")

        rig.loop.gated.edit = explode  # type: ignore[method-assign]
    (fact,) = rig.add(1)
    rig.loop.tick()
    assert rig.statuses()[fact] == "failed"
    found_cause, found_error = _fact(world, fact)
    assert found_cause == cause and error in (found_error or "")


def test_a_fact_the_gate_rejects_records_specificity(world: World) -> None:
    rig = make_rig(world, gate=FAIL_SPECIFICITY)
    (fact,) = rig.add(1)
    rig.loop.tick()
    assert rig.statuses()[fact] == "rejected"
    assert _fact(world, fact)[0] == "specificity"


def test_facts_that_missed_efficacy_are_retried_in_small_batches_of_their_own(world: World) -> None:
    gate = PASS_ALL.model_copy(update={"min_efficacy": 1.01, "efficacy_retries": 1, "retry_batch_size": 2})
    rig = make_rig(world, gate=gate)  # [editor] batch_size 4
    assert rig.loop.gated is not None
    editor = rig.loop.gated.editor
    batches: list[list[str]] = []
    original = editor.propose

    def recording(examples: Any, masters: Any = None, *, strengths: Any = None) -> Any:
        batches.append([e.prompt.split()[-2] for e in examples])  # the fact's number
        return original(examples, masters, strengths=strengths)

    editor.propose = recording  # type: ignore[method-assign]
    rig.add(4)
    rig.loop.tick()  # every fact misses efficacy: back to pending for one more try
    rig.add(4, start=10)
    for _ in range(3):
        rig.loop.tick()
    assert batches == [["0", "1", "2", "3"], ["0", "1"], ["2", "3"], ["10", "11", "12", "13"]]


def test_the_gate_drift_of_the_live_version_is_exported_between_probe_runs(world: World) -> None:
    rig = make_rig(world)
    assert rig.metric("ked_gate_base_agreement_ratio") == 1.0  # version 0 is the base model
    rig.add(2)
    rig.loop.tick()
    with world.sessions() as session:
        run = session.scalars(select(ProbeRun).where(ProbeRun.kind == "gate", ProbeRun.commit_version == 1)).one()
        row = session.get(Commit, 1)
        assert row is not None
    # One summary of the gate's final try, recorded with the gate run and the commit alike.
    assert row.edit_metrics["specificity_agreement"] == run.scores["agreement"]
    assert row.edit_metrics["specificity_mean_kl"] == run.scores["mean_kl"]
    assert row.edit_metrics["efficacy"] == run.scores["efficacy"]
    drift = rig.state.now().drift
    assert drift is not None and (drift.version, drift.agreement, drift.mean_kl) == (1, run.scores["agreement"], run.scores["mean_kl"])
    assert rig.metric("ked_gate_base_agreement_ratio") == run.scores["agreement"]
    assert rig.metric("ked_gate_base_mean_kl_nats") == run.scores["mean_kl"]
    assert rig.metric("ked_probe_drift_ratio", {"probe": "standing"}) == 0.0  # the periodic probes did not run

    assert make_rig(world).metric("ked_gate_base_mean_kl_nats") == run.scores["mean_kl"]  # read back at a restart
    rig.view.request_revert(to_version=0, last=None, reason="test", requested_by="api:test")
    assert (rig.metric("ked_gate_base_agreement_ratio"), rig.metric("ked_gate_base_mean_kl_nats")) == (1.0, 0.0)


# --- trust: protected facts in the gate, and facts released from a source's limits (docs/trust.md) ---


#: An edit strong enough to move the edited prompt's own answer on the random tiny model (0.05 does not),
#: and weak enough that edits of unrelated prompts leave it (found by trying 0.05 to 5).
STRONG_EDIT_LR = 0.5


def _protected_world(world: World, path: Any, lines: str) -> World:
    path.write_text(lines)
    ingest = world.settings.ingest.model_copy(update={"protected_facts": path})
    return World(world.root, world.settings.model_copy(update={"ingest": ingest}), world.engine, world.sessions)


def test_a_fact_that_changes_a_protected_answer_is_rejected_and_the_answer_survives(world: World, tmp_path: Any) -> None:
    from editing.gate.checks import PROTECTED_REASON

    protected = _protected_world(
        world, tmp_path / "protected.jsonl", '{"prompt": "The capital of country 0 is", "answer": "Rome"}\n'
    )
    # a strong edit, so that the culprit's edit certainly moves its own prompt's answer on the tiny model
    strong = EDITOR.model_copy(update={"edit_lr": STRONG_EDIT_LR})
    rig = make_rig(protected, edit_loop=EditLoopConfig(min_batch=1, max_wait_seconds=0), editor=strong)
    check = rig.loop.gated.checker.protected if rig.loop.gated else None
    assert check is not None and len(check) == 1
    loaded = rig.loop.loaded
    before = check.answers(loaded.model, loaded.tokenizer)
    culprit, *others = rig.add(1)  # the culprit edits the protected prompt itself ("Paris 0")
    with world.sessions.begin() as session:
        items = [
            (FactIn(prompt=prompt, target_new=target), Origin("test", "facts.jsonl", prompt))
            for prompt, target in (("Lionel Messi plays the sport of", "tennis"), ("Bananas are coloured", "blue"))
        ]
        others = list(intake.add_facts(session=session, items=items).fact_ids)
    rig.loop.tick()
    statuses = rig.statuses()
    with world.sessions() as session:
        reason = session.get(Fact, culprit).last_error or ""  # type: ignore[union-attr]
    assert statuses[culprit] == "rejected"
    assert reason.startswith(PROTECTED_REASON) and f"'The capital of country 0 is' -> 'Rome', {tmp_path}" in reason
    assert check.answers(loaded.model, loaded.tokenizer) == before  # the live model still answers as before
    assert rig.metric("ked_protected_fact_violations_total") == 1
    assert rig.metric("ked_protected_fact_checks_total") >= 1 and rig.metric("ked_protected_facts") == 1
    assert [statuses[fid] for fid in others] == ["committed", "committed"]  # bisection kept the innocent facts


def test_a_malformed_protected_facts_file_stops_the_loop_from_starting(world: World, tmp_path: Any) -> None:
    from ingest.trust import ProtectedFactsError

    bad = _protected_world(world, tmp_path / "protected.jsonl", '{"prompt": "x", "answer": "y"}\n{"prompt": 1}\n')
    with pytest.raises(ProtectedFactsError, match=f"protected facts file {tmp_path / 'protected.jsonl'} line 2"):
        make_rig(bad)


def test_facts_held_by_a_limit_are_released_by_the_loop(world: World) -> None:
    from ingest.config import JsonlSource
    from ingest.trust import trust_rules

    source = JsonlSource(name="bulk", location="bulk.jsonl", max_pending=2)
    ingest = world.settings.ingest.model_copy(update={"jsonl": (source,)})
    limited = World(world.root, world.settings.model_copy(update={"ingest": ingest}), world.engine, world.sessions)
    rig = make_rig(limited, edit_loop=EditLoopConfig(min_batch=1, max_wait_seconds=0))
    with world.sessions.begin() as session:
        items = [(FactIn(prompt=f"Bulk fact {i} is", target_new=f"x{i}"), Origin("jsonl:bulk", "bulk.jsonl", str(i))) for i in range(4)]
        ids = list(intake.add_facts(session=session, items=items, rules=trust_rules(ingest)).fact_ids)
    assert [rig.statuses()[fid] for fid in ids] == ["pending", "pending", "held", "held"]
    rig.loop.tick()  # the first two commit, the loop releases the others and edits them too
    assert {rig.statuses()[fid] for fid in ids} == {"committed"}
    assert rig.metric("ked_facts_released_total", {"source": "jsonl:bulk"}) == 2


def test_every_commit_and_revert_publishes_the_version_it_leaves_live(world: World, tmp_path: Any) -> None:
    import json as json_module

    from daemon.publishing import PublishConfig, Publisher

    rig = make_rig(world)
    publisher = Publisher(PublishConfig(enabled=True, directory=tmp_path / "published", format="hf"), rig.loop.loaded, rig.loop.history.state)
    rig.loop.publisher = publisher
    rig.metrics.watch_publisher(publisher.stats)
    publisher.start()  # publishes the live version (0) once
    try:
        rig.add(2)
        rig.loop.tick()
        rig.add(2, start=30)
        rig.loop.tick()
        rig.view.request_revert(to_version=None, last=1, reason="bad facts", requested_by="api:test")
        deadline = time.monotonic() + 120
        while publisher.stats().last_version != 1 or publisher.stats().published < 4:
            assert time.monotonic() < deadline, publisher.stats()
            time.sleep(0.2)
    finally:
        publisher.stop()
    current = json_module.loads((tmp_path / "published" / "current.json").read_text())
    assert current["version"] == 1 and current["weights_sha256"] == world.recorded_hash(1)
    assert (tmp_path / "published" / "current").resolve().name == "v1"
    assert rig.metric("ked_publish_last_version") == 1 and rig.metric("ked_publish_failures") == 0
