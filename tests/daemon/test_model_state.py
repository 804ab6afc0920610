"""`daemon.model_state`: the ledger joined to the versioned model state (open and recover, exact reverts).

Every test runs on a real SQLite ledger and a real artefact store in a temporary state directory,
with a tiny Llama saved as a local Hugging Face directory and loaded by `editing.model.loading.load_model`
(as the daemon and the CLI load `[model] source`). Commits go through `ModelHistory.commit` with a
ledger callback that calls `store.commits.record_commit` on facts claimed into `editing`.

`World` and the fixtures `world`, `worlds` and `tiny_model_dir` are also used by tests/daemon/test_ledger_revert.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings, load_settings
from daemon.model_state import (
    apply_pending_reverts,
    artefact_store,
    check_rebuildable,
    commit_refs,
    open_history,
    revert_model,
)
from editing.model.loading import LoadedModel, load_model
from editing.state.history import CommitRecord, ModelHistory, prepare_commit
from store import commits, intake, work
from store.artefacts import TEMP_PREFIX, ArtefactKind
from store.db import make_engine, make_session_factory, upgrade_to_head
from store.errors import UnknownVersion
from store.models import Commit, CommitFact, Fact, Revert
from store.records import CommitIn, FactIn, Origin
from store.retention import BeyondHorizon

EDIT_MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
PROBE_TEXT = "The capital of France is Paris."


@pytest.fixture(scope="session", name="tiny_model_dir")
def tiny_model_dir_fixture(tiny_lm: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama of tests/daemon/conftest.py saved as a local Hugging Face model directory."""
    model, tokenizer = tiny_lm
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class World:
    """A state directory, its ledger and the settings the daemon and `python -m daemon.ledger` would use."""

    root: Path
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    def load(self) -> LoadedModel:
        """A fresh load of the configured model (as a daemon start or an offline command does)."""
        return load_model(self.settings.model, cache_dir=self.settings.model_cache_dir())

    def open(self) -> ModelHistory:
        """Load the model and open the model state on it, recovered to the ledger's current version."""
        history, _ = open_history(self.settings, self.load(), self.sessions)
        return history

    def commit(self, history: ModelHistory, seed: int, facts: int = 2) -> int:
        """Add `facts` facts, claim them and commit random low-rank deltas for them; returns the version."""
        with self.sessions.begin() as session:
            items = [
                (FactIn(prompt=f"prompt {seed}.{i}", target_new=f"target {seed}"), Origin("test", "t"))
                for i in range(facts)
            ]
            intake.add_facts(session=session, items=items)
            fact_ids = tuple(fact.id for fact in work.claim_pending(session=session, limit=facts))
            version = commits.next_version(session)
        prepared = prepare_commit(_deltas(history, seed), {})

        def record(rec: CommitRecord) -> None:
            with self.sessions.begin() as session:
                commits.record_commit(
                    session=session,
                    commit=CommitIn(
                        fact_ids=fact_ids,
                        artefact_path=rec.artefact_path,
                        artefact_sha256=rec.artefact_sha256,
                        weights_sha256=rec.weights_sha256,
                        model_fingerprint=history.fingerprint,
                    ),
                    expected_version=rec.version,
                    expected_parent=rec.parent,
                )

        history.commit(prepared, version=version, record=record)
        with self.sessions() as session:
            history.consolidate(commit_refs(session))
        return version

    def recorded_hash(self, version: int) -> str:
        """The weights hash the ledger recorded for `version` (0: the genesis's, the base weights)."""
        if version == 0:
            return artefact_store(self.settings).metadata(ArtefactKind.SNAPSHOT, 0)["weights_sha256"]
        with self.sessions() as session:
            row = session.get(Commit, version)
            assert row is not None and row.weights_sha256 is not None
            return row.weights_sha256

    def statuses(self) -> dict[int, str]:
        with self.sessions() as session:
            return {fact.id: fact.status.value for fact in session.scalars(select(Fact))}

    def fact_ids(self, version: int) -> list[int]:
        with self.sessions() as session:
            query = select(CommitFact.fact_id).where(CommitFact.commit_version == version)
            return list(session.scalars(query.order_by(CommitFact.fact_id)))

    def reverts(self) -> list[Revert]:
        with self.sessions() as session:
            return list(session.scalars(select(Revert).order_by(Revert.id)))

    def current_version(self) -> int:
        with self.sessions() as session:
            return commits.current_version(session)

    def artefacts(self) -> list[str]:
        return sorted(p.name for p in self.settings.artefact_dir().iterdir())


def _deltas(history: ModelHistory, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: 0.05 * torch.randn(base.shape[0], 3, generator=gen) @ torch.randn(3, base.shape[1], generator=gen)
        for name, base in history.state.base().items()
    }


def logits(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def model_env(model_dir: Path, *, snapshot_every: int = 25, retention_commits: int = 200) -> dict[str, str]:
    """The KED_* variables that point the settings (of the test and of the CLI) at the tiny model."""
    return {
        "KED_MODEL__SOURCE": str(model_dir),
        "KED_MODEL__DEVICE": "cpu",
        "KED_MODEL__EDIT_MODULES": json.dumps(EDIT_MODULES),
        "KED_STORE__SNAPSHOT_EVERY": str(snapshot_every),
        "KED_STORE__RETENTION_COMMITS": str(retention_commits),
    }


def make_world(root: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path, **policy: int) -> World:
    """Clear the KED_* environment, point it at the tiny model and `policy`, and open the ledger."""
    for name in [k for k in os.environ if k.startswith("KED_")]:
        monkeypatch.delenv(name)
    for name, value in model_env(model_dir, **policy).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(root)  # no config.toml from the working directory
    settings = load_settings(state_dir=root / "state")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.ledger_url())
    upgrade_to_head(engine)
    return World(root, settings, engine, make_session_factory(engine))


@pytest.fixture(name="worlds")
def worlds_fixture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> Iterator[Callable[..., World]]:
    """`worlds(snapshot_every=, retention_commits=)`: a fresh state directory and ledger; engines closed at the end."""
    made: list[World] = []

    def make(**policy: int) -> World:
        made.append(make_world(tmp_path, monkeypatch, tiny_model_dir, **policy))
        return made[-1]

    yield make
    for each in made:
        each.engine.dispose()


@pytest.fixture(name="world")
def world_fixture(worlds: Callable[..., World]) -> World:
    """A fresh state directory with an empty ledger; the settings name the tiny model (default retention)."""
    return worlds()


# --- open_history ---------------------------------------------------------------------------------


def test_open_history_on_a_fresh_load_rebuilds_the_ledgers_current_version(world: World) -> None:
    history = world.open()
    base_hash = history.state.weights_sha256()
    assert base_hash == world.recorded_hash(0)  # the genesis records the base
    world.commit(history, seed=1)
    world.commit(history, seed=2)
    live_masters = history.state.masters()
    live_logits = logits(history.state.model, world.load().tokenizer)
    del history  # the process ends: only the ledger and the artefacts remain

    loaded = world.load()
    rebuilt, report = open_history(world.settings, loaded, world.sessions)

    assert (report.version, report.start, report.replayed, report.removed) == (2, 0, 2, ())
    assert rebuilt.state.version == 2
    assert rebuilt.state.weights_sha256() == world.recorded_hash(2) != base_hash
    assert all(torch.equal(rebuilt.state.masters()[name], live_masters[name]) for name in EDIT_MODULES)
    assert torch.equal(logits(loaded.model, loaded.tokenizer), live_logits)


def test_open_history_removes_an_orphan_artefact_and_temporary_files(world: World) -> None:
    history = world.open()
    world.commit(history, seed=1)
    # A crash between the artefact (step 1) and the ledger transaction (step 2): the file exists, the
    # ledger does not know version 2.
    history.commit(prepare_commit(_deltas(history, 2), {}), version=2, record=lambda rec: None)
    orphan = artefact_store(world.settings).path(ArtefactKind.COMMIT, 2)
    temporary = world.settings.artefact_dir() / f"{TEMP_PREFIX}commit-00000003.safetensors"
    temporary.write_bytes(b"half a file")
    assert orphan.is_file() and world.current_version() == 1
    del history

    rebuilt, report = open_history(world.settings, world.load(), world.sessions)

    assert sorted(report.removed) == sorted([orphan, temporary])
    assert not orphan.exists() and not temporary.exists()
    assert world.artefacts() == ["commit-00000001.safetensors", "snapshot-00000000.safetensors"]
    assert report.version == rebuilt.state.version == 1
    assert rebuilt.state.weights_sha256() == world.recorded_hash(1)


def test_open_history_completes_a_revert_filed_while_the_daemon_was_stopped(world: World) -> None:
    history = world.open()
    for seed in (1, 2, 3):
        world.commit(history, seed)
    del history
    with world.sessions.begin() as session:  # what `revert` writes when the daemon holds the lock
        commits.revert_to(session=session, to_version=1, reason="test", requested_by="test")
    assert world.reverts()[0].weights_restored_at is None

    rebuilt = world.open()

    assert rebuilt.state.version == 1 and rebuilt.state.weights_sha256() == world.recorded_hash(1)
    assert world.reverts()[0].weights_restored_at is not None


def test_a_revert_filed_during_recovery_is_left_for_apply_pending_reverts(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = world.open()
    for seed in (1, 2, 3):
        world.commit(history, seed)
    del history
    with world.sessions.begin() as session:  # filed while the daemon was stopped: recovery covers it
        before = commits.revert_last(session=session, count=1, reason=None, requested_by="cli:a").id
    recover = ModelHistory.recover

    def recover_while_the_cli_files_a_revert(self: ModelHistory, *args: Any, **kwargs: Any) -> Any:
        report = recover(self, *args, **kwargs)
        with world.sessions.begin() as session:  # `revert` while the daemon holds the lock, mid-recovery
            commits.revert_to(session=session, to_version=1, reason=None, requested_by="cli:b")
        return report

    monkeypatch.setattr(ModelHistory, "recover", recover_while_the_cli_files_a_revert)
    history, report = open_history(world.settings, world.load(), world.sessions)

    # The rebuild is version 2; the ledger is at 1 now, so nothing may be marked restored yet.
    assert report.version == history.state.version == 2 and world.current_version() == 1
    assert [r.weights_restored_at is None for r in world.reverts()] == [True, True]
    assert apply_pending_reverts(history, world.sessions) == [before, before + 1]
    assert history.state.weights_sha256() == world.recorded_hash(1)
    assert [r.weights_restored_at is None for r in world.reverts()] == [False, False]


# --- revert_model, apply_pending_reverts, check_rebuildable ------------------------------------------


def test_revert_model_restores_the_recorded_weights_and_moves_the_facts(world: World) -> None:
    history = world.open()
    for seed in (1, 2, 3):
        world.commit(history, seed)
    gone = world.fact_ids(2) + world.fact_ids(3)

    outcome = revert_model(history, world.sessions, to_version=None, last=2, reason="probe drop", requested_by="ops")

    assert (outcome.from_version, outcome.to_version, outcome.reverted_commits, outcome.reverted_facts) == (3, 1, 2, 4)
    assert outcome.weights_sha256 == history.state.weights_sha256() == world.recorded_hash(1)
    statuses = world.statuses()
    assert [statuses[i] for i in gone] == ["reverted"] * 4
    assert [statuses[i] for i in world.fact_ids(1)] == ["committed"] * 2
    (audit,) = world.reverts()
    assert (audit.id, audit.reason, audit.requested_by) == (outcome.revert_id, "probe drop", "ops")
    assert audit.weights_restored_at is not None

    revert_model(history, world.sessions, to_version=0, last=None, reason=None, requested_by="ops")
    assert history.state.version == 0 and history.state.weights_sha256() == world.recorded_hash(0)


def test_apply_pending_reverts_brings_the_live_weights_to_the_ledgers_version(world: World) -> None:
    history = world.open()
    for seed in (1, 2, 3):
        world.commit(history, seed)
    assert apply_pending_reverts(history, world.sessions) == []
    with world.sessions.begin() as session:
        filed = commits.revert_last(session=session, count=1, reason=None, requested_by="cli:test").id
    # The live weights (3) are behind the ledger (2): an exact revert from here would start from the
    # wrong version, so revert_model refuses until the filed revert is applied.
    with pytest.raises(UnknownVersion, match="apply pending reverts first"):
        revert_model(history, world.sessions, to_version=1, last=None, reason=None, requested_by="ops")
    assert history.state.version == 3 and len(world.reverts()) == 1

    assert apply_pending_reverts(history, world.sessions) == [filed]

    assert history.state.version == 2 and history.state.weights_sha256() == world.recorded_hash(2)
    assert world.reverts()[0].weights_restored_at is not None
    assert apply_pending_reverts(history, world.sessions) == []


def test_check_rebuildable_refuses_versions_beyond_the_horizon_without_the_model(worlds: Callable[..., World]) -> None:
    world = worlds(snapshot_every=2, retention_commits=2)
    history = world.open()
    for seed in range(1, 7):
        world.commit(history, seed)
    store = artefact_store(world.settings)
    with world.sessions() as session:
        assert history.horizon(commit_refs(session)) == 4
        for version in (0, 4, 5, 6):
            check_rebuildable(store, session, version)
        with pytest.raises(BeyondHorizon, match="commit 3"):
            check_rebuildable(store, session, 3)
        with pytest.raises(UnknownVersion, match="version 9"):
            check_rebuildable(store, session, 9)
