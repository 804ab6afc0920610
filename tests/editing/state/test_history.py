"""Versioned model state: commit protocol, exact reverts, recovery after SIGKILL at every step, consolidation."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from editing.errors import ModelMismatch
from editing.state.history import CommitRecord, CommitRef, CommitStep, ModelHistory, prepare_commit
from editing.state.weights import WeightsHashMismatch, WeightState
from store.artefacts import TEMP_PREFIX, ArtefactCorrupt, ArtefactKind, ArtefactStore
from store.retention import BeyondHorizon

REPO = Path(__file__).resolve().parents[3]
NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


class Holder:
    """A stand-in for the editor's normaliser statistics (EMSEditor has the same two methods)."""

    def __init__(self) -> None:
        self.state = {"count": torch.tensor(0.0, dtype=torch.float64), "mean": torch.zeros(4)}

    def edit_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_edit_state(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}


def _editor_state(version: int) -> dict[str, torch.Tensor]:
    return {"count": torch.tensor(float(version), dtype=torch.float64), "mean": torch.full((4,), version / 10)}


def _deltas(state: WeightState, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: 1e-2 * torch.randn(base.shape[0], 3, generator=gen) @ torch.randn(3, base.shape[1], generator=gen)
        for name, base in state.base().items()
    }


class Ledger:
    """Just enough of a ledger for in-process tests: commit refs and a current version."""

    def __init__(self) -> None:
        self.refs: dict[int, CommitRef] = {}
        self.current = 0

    def record(self, rec: CommitRecord) -> None:
        self.refs[rec.version] = CommitRef(rec.version, rec.parent, rec.artefact_sha256, rec.weights_sha256)
        self.current = rec.version


def _setup(
    engine_tiny_lm: Any, tmp_path: Path, dtype: torch.dtype = torch.float32, **policy: Any
) -> tuple[torch.nn.Module, WeightState, ModelHistory, Ledger, Holder]:
    model, names = engine_tiny_lm("llama", dtype=dtype)
    state = WeightState(model, names)
    holder = Holder()
    history = ModelHistory(state, ArtefactStore(tmp_path / "artefacts"), editor=holder, fingerprint="base", **policy)
    ledger = Ledger()
    history.open(ledger.refs)
    return model, state, history, ledger, holder


def _commit(history: ModelHistory, ledger: Ledger, version: int) -> CommitRecord:
    prepared = prepare_commit(_deltas(history.state, version), _editor_state(version))
    return history.commit(prepared, version=version, record=ledger.record)


def _fresh(
    engine_tiny_lm: Any, tmp_path: Path, dtype: torch.dtype = torch.float32
) -> tuple[WeightState, ModelHistory, Holder]:
    model, names = engine_tiny_lm("llama", dtype=dtype)
    state = WeightState(model, names)
    holder = Holder()
    return state, ModelHistory(state, ArtefactStore(tmp_path / "artefacts"), editor=holder, fingerprint="base"), holder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reverts_and_restarts_rebuild_exactly_the_recorded_state(
    dtype: torch.dtype, engine_tiny_lm: Any, tmp_path: Path
) -> None:
    _, state, history, ledger, holder = _setup(engine_tiny_lm, tmp_path, dtype, snapshot_every=2, retention_commits=None)
    hashes = {0: state.weights_sha256()}
    for version in (1, 2, 3, 4):
        hashes[version] = _commit(history, ledger, version).weights_sha256
        history.consolidate(ledger.refs)
    assert state.weights_sha256() == hashes[4] and torch.equal(holder.state["mean"], _editor_state(4)["mean"])

    history.revert_to(1, ledger.refs, record=lambda: None)
    assert state.version == 1 and state.weights_sha256() == hashes[1]
    assert torch.equal(holder.state["count"], _editor_state(1)["count"])  # editor state reverted too
    ledger.current = 1
    hashes[5] = _commit(history, ledger, 5).weights_sha256  # a new branch: 5 on top of 1
    assert ledger.refs[5].parent == 1

    fresh, fresh_history, fresh_holder = _fresh(engine_tiny_lm, tmp_path, dtype)
    fresh_history.open(ledger.refs)
    report = fresh_history.recover(ledger.refs, ledger.current)
    assert (report.version, report.start, report.replayed) == (5, 0, 2)
    assert fresh.weights_sha256() == hashes[5] == state.weights_sha256()
    assert all(torch.equal(fresh.masters()[n], state.masters()[n]) for n in state.module_names)
    assert torch.equal(fresh_holder.state["mean"], _editor_state(5)["mean"])
    fresh_history.revert_to(0, ledger.refs, record=lambda: None)
    assert fresh.weights_sha256() == hashes[0] and fresh_holder.state["count"].item() == 0


def test_recovery_starts_from_the_newest_snapshot_and_restores_its_editor_state(engine_tiny_lm: Any, tmp_path: Path) -> None:
    _, _, history, ledger, _ = _setup(engine_tiny_lm, tmp_path, snapshot_every=3, retention_commits=None)
    reports = []
    for version in range(1, 8):
        _commit(history, ledger, version)
        reports.append(history.consolidate(ledger.refs))
    assert [r.snapshot for r in reports] == [None, None, 3, None, None, 6, None]
    fresh, fresh_history, holder = _fresh(engine_tiny_lm, tmp_path)
    fresh_history.open(ledger.refs)
    report = fresh_history.recover(ledger.refs, 6)
    assert (report.start, report.replayed) == (6, 0)
    assert fresh.weights_sha256() == ledger.refs[6].weights_sha256
    assert torch.equal(holder.state["mean"], _editor_state(6)["mean"])


def test_retention_prunes_old_artefacts_and_refuses_reverts_beyond_the_horizon(engine_tiny_lm: Any, tmp_path: Path) -> None:
    _, state, history, ledger, _ = _setup(engine_tiny_lm, tmp_path, snapshot_every=2, retention_commits=3)
    for version in range(1, 9):
        _commit(history, ledger, version)
        report = history.consolidate(ledger.refs)
    assert report.horizon == history.horizon(ledger.refs) == 4
    assert history.store.versions(ArtefactKind.COMMIT) == {4, 5, 6, 7, 8}
    assert history.store.versions(ArtefactKind.SNAPSHOT) == {0, 4, 6, 8}
    recorded: list[int] = []
    with pytest.raises(BeyondHorizon, match="oldest version that can still be rebuilt is 4"):
        history.revert_to(3, ledger.refs, record=lambda: recorded.append(3))
    assert recorded == [] and state.version == 8  # refused before the ledger was touched
    history.revert_to(4, ledger.refs, record=lambda: recorded.append(4))
    assert recorded == [4] and state.weights_sha256() == ledger.refs[4].weights_sha256


def test_a_failed_ledger_transaction_removes_the_artefact_and_changes_nothing(engine_tiny_lm: Any, tmp_path: Path) -> None:
    _, state, history, ledger, holder = _setup(engine_tiny_lm, tmp_path)
    _commit(history, ledger, 1)
    before = (state.weights_sha256(), holder.edit_state())

    def refuse(rec: CommitRecord) -> None:
        raise RuntimeError("the ledger assigned another version")

    with pytest.raises(RuntimeError, match="another version"):
        history.commit(prepare_commit(_deltas(state, 2), _editor_state(2)), version=2, record=refuse)
    assert not history.store.exists(ArtefactKind.COMMIT, 2)
    assert state.version == 1 and state.weights_sha256() == before[0]
    assert torch.equal(holder.state["mean"], before[1]["mean"])


def test_observer_sees_the_protocol_steps_in_order(engine_tiny_lm: Any, tmp_path: Path) -> None:
    _, state, history, ledger, _ = _setup(engine_tiny_lm, tmp_path)
    seen: list[tuple[CommitStep, int, bool]] = []
    prepared = prepare_commit(_deltas(state, 1), {})
    history.commit(
        prepared,
        version=1,
        record=ledger.record,
        observer=lambda step: seen.append((step, state.version, history.store.exists(ArtefactKind.COMMIT, 1))),
    )
    assert seen == [
        (CommitStep.ARTEFACT_TEMP_WRITTEN, 0, False),
        (CommitStep.ARTEFACT_DURABLE, 0, True),
        (CommitStep.LEDGER_RECORDED, 0, True),
        (CommitStep.PUBLISHED, 1, True),
    ]


def test_damaged_artefacts_and_wrong_hashes_stop_recovery(engine_tiny_lm: Any, tmp_path: Path) -> None:
    _, _, history, ledger, _ = _setup(engine_tiny_lm, tmp_path)
    _commit(history, ledger, 1)
    _commit(history, ledger, 2)
    fresh, fresh_history, _ = _fresh(engine_tiny_lm, tmp_path)
    fresh_history.open(ledger.refs)
    wrong = dict(ledger.refs)
    wrong[2] = CommitRef(2, 1, ledger.refs[2].artefact_sha256, "0" * 64)
    with pytest.raises(WeightsHashMismatch, match="rebuilt from the base and 2 commits"):
        fresh_history.recover(wrong, 2)
    path = history.store.path(ArtefactKind.COMMIT, 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtefactCorrupt, match="ledger recorded"):
        fresh_history.recover(ledger.refs, 2)
    assert fresh.version == 0


def test_open_refuses_a_state_directory_made_for_another_model(engine_tiny_lm: Any, tmp_path: Path) -> None:
    _, _, history, ledger, _ = _setup(engine_tiny_lm, tmp_path)
    _commit(history, ledger, 1)
    other_model, _ = engine_tiny_lm("llama", seed=1)
    other = ModelHistory(WeightState(other_model, NAMES), ArtefactStore(tmp_path / "artefacts"))
    with pytest.raises(ModelMismatch, match="base weights"):
        other.open(ledger.refs)
    model, _ = engine_tiny_lm("llama")
    narrower = ModelHistory(WeightState(model, NAMES[:1]), ArtefactStore(tmp_path / "artefacts"))
    with pytest.raises(ModelMismatch, match="edit_modules"):
        narrower.open(ledger.refs)
    renamed = ModelHistory(WeightState(model, NAMES), ArtefactStore(tmp_path / "artefacts"), fingerprint="other")
    with pytest.raises(ModelMismatch, match="another base model"):
        renamed.open(ledger.refs)
    # a state directory made by an earlier version of this code, which fingerprinted the same model otherwise
    upgraded = ModelHistory(
        WeightState(model, NAMES), ArtefactStore(tmp_path / "artefacts"), fingerprint="new", earlier_fingerprints=("base",)
    )
    upgraded.open(ledger.refs)


def test_the_real_editor_state_travels_with_commits_and_reverts(
    engine_tiny_lm: Any, bpe_tokenizer: Any, tmp_path: Path
) -> None:
    from editing.config import EditorConfig
    from editing.data import EditExample
    from editing.engine.emsedit import EMSEditor

    model, names = engine_tiny_lm("llama")
    editor = EMSEditor(model, bpe_tokenizer, names, EditorConfig(rank=16, n_blocks=1, lm_batch_size=4))
    state = WeightState(model, names)
    history = ModelHistory(state, ArtefactStore(tmp_path / "artefacts"), editor=editor)
    ledger = Ledger()
    history.open(ledger.refs)
    initial = editor.edit_state()
    plan = editor.propose([EditExample("The capital of France is", "Rome")], masters=state.masters())
    prepared = prepare_commit(plan.deltas, plan.editor_state)
    history.commit(prepared, version=1, record=ledger.record)
    changed = editor.edit_state()
    assert any(not torch.equal(changed[k], initial[k]) for k in initial)
    assert all(torch.equal(changed[k], plan.editor_state[k]) for k in initial)
    history.revert_to(0, ledger.refs, record=lambda: None)
    assert all(torch.equal(editor.edit_state()[k], initial[k]) for k in initial)


# --- crash safety: a real SQLite ledger, a real subprocess, SIGKILL at every step of the protocol ---------

class TinyNet(torch.nn.Module):
    """Two Linear layers with seeded weights: what the protocol needs of a model, without importing transformers.

    The crash children start several at once; a plain torch module keeps each start at a few seconds.
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.up = torch.nn.Linear(24, 48)
        self.down = torch.nn.Linear(48, 24)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))


TINY_NAMES = ["up", "down"]
KILL_POINTS = ["artefact-temp-written", "artefact-durable", "in-transaction", "ledger-recorded", "published"]
DURABLE_AT = {"ledger-recorded", "published"}  # kill points after which commit 2 must survive


def _pause() -> None:
    print("PAUSED", flush=True)
    time.sleep(600)


def crash_child() -> None:
    """Child process: commit version 1, then commit version 2 and stop (for SIGKILL) at `argv[3]`."""
    from store.commits import record_commit
    from store.db import make_engine, make_session_factory
    from store.records import CommitIn
    from store.work import claim_pending

    state_dir, url, kill_at = sys.argv[1:4]
    state = WeightState(TinyNet(), TINY_NAMES)
    history = ModelHistory(state, ArtefactStore(Path(state_dir) / "artefacts"), editor=Holder())
    history.open({})
    factory = make_session_factory(make_engine(url))
    for version in (1, 2):
        with factory.begin() as session:
            ids = tuple(f.id for f in claim_pending(session=session, limit=2))
        crash_here = version == 2

        def record(rec: CommitRecord, ids: tuple[int, ...] = ids, crash_here: bool = crash_here) -> None:
            with factory.begin() as session:
                commit = CommitIn(
                    ids,
                    artefact_path=rec.artefact_path,
                    artefact_sha256=rec.artefact_sha256,
                    weights_sha256=rec.weights_sha256,
                )
                row = record_commit(session=session, commit=commit)
                if row.version != rec.version:
                    raise RuntimeError(f"the ledger assigned version {row.version}, the artefact is {rec.version}")
                if crash_here and kill_at == "in-transaction":
                    session.flush()
                    _pause()

        def observe(step: CommitStep, crash_here: bool = crash_here) -> None:
            if crash_here and step.value == kill_at:
                _pause()

        prepared = prepare_commit(_deltas(state, version), _editor_state(version))
        history.commit(prepared, version=version, record=record, observer=observe)


@pytest.fixture(scope="module")
def crash_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    from store.db import make_engine, upgrade_to_head

    root = tmp_path_factory.mktemp("crash")
    engine = make_engine(f"sqlite:///{root / 'template.sqlite3'}")
    upgrade_to_head(engine)
    engine.dispose()
    yield {"root": root, "template": root / "template.sqlite3"}


def _seed_ledger(url: str) -> None:
    from store.db import make_engine, make_session_factory
    from store.intake import add_facts
    from store.records import FactIn, Origin

    engine = make_engine(url)
    with make_session_factory(engine).begin() as session:
        items = [(FactIn(f"Fact {i} is", f"answer {i}"), Origin("test", "crash", f"line {i}")) for i in range(4)]
        add_facts(session=session, items=items)
    engine.dispose()


def _recover(state_dir: Path, url: str) -> tuple[WeightState, Holder, Any, dict[int, CommitRef], list[int]]:
    from sqlalchemy import select

    from store.commits import current_version
    from store.db import make_engine, make_session_factory
    from store.models import Commit
    from store.work import reset_stuck_editing

    engine = make_engine(url)
    with make_session_factory(engine).begin() as session:
        stuck = reset_stuck_editing(session=session)
        refs = {
            c.version: CommitRef(c.version, c.parent_version, c.artefact_sha256, c.weights_sha256)
            for c in session.scalars(select(Commit))
        }
        current = current_version(session)
    engine.dispose()
    state = WeightState(TinyNet(), TINY_NAMES)
    holder = Holder()
    history = ModelHistory(state, ArtefactStore(state_dir / "artefacts"), editor=holder)
    history.open(refs)
    report = history.recover(refs, current)
    return state, holder, report, refs, stuck


def test_sigkill_at_every_step_recovers_the_last_durable_commit(crash_setup: dict[str, Path]) -> None:
    """Scenario, for each kill point, all children in parallel:
    1. a child commits version 1, then starts version 2 and stops at the kill point;
    2. the parent SIGKILLs it;
    3. recovery moves in-flight facts back to pending, removes orphans, rebuilds and checks the hash.
    """
    import shutil

    children = {}
    for point in KILL_POINTS:
        state_dir = crash_setup["root"] / point
        state_dir.mkdir()
        shutil.copyfile(crash_setup["template"], state_dir / "ledger.sqlite3")
        url = f"sqlite:///{state_dir / 'ledger.sqlite3'}"
        _seed_ledger(url)
        argv = [str(state_dir), url, point]
        code = "from tests.editing.state.test_history import crash_child; crash_child()"
        children[point] = subprocess.Popen(
            [sys.executable, "-c", code, *argv], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
    for point, child in children.items():
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "PAUSED", f"child for {point} did not reach its kill point"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL

    for point in KILL_POINTS:
        state_dir = crash_setup["root"] / point
        state, holder, report, refs, stuck = _recover(state_dir, f"sqlite:///{state_dir / 'ledger.sqlite3'}")
        expected = 2 if point in DURABLE_AT else 1
        assert report.version == state.version == expected, point
        assert state.weights_sha256() == refs[expected].weights_sha256, point
        assert torch.equal(holder.state["mean"], _editor_state(expected)["mean"]), point
        assert stuck == ([] if expected == 2 else [3, 4]), point  # the in-flight facts are pending again
        artefacts = sorted(p.name for p in (state_dir / "artefacts").iterdir())
        assert not [name for name in artefacts if name.startswith(TEMP_PREFIX)], point
        assert artefacts == [f"commit-{v:08d}.safetensors" for v in range(1, expected + 1)] + ["snapshot-00000000.safetensors"], point
        if point in {"artefact-temp-written", "artefact-durable", "in-transaction"}:
            assert report.removed, point  # the orphan (temporary or complete) was there and is gone
