"""Where the ledger meets the versioned model state: open and recover, exact reverts, pending reverts.

`editing.state.history.ModelHistory` knows artefacts and weights but not the ledger; `store.commits` knows the
ledger but not the weights. This module joins them for the daemon and for the offline commands of
`python -m daemon.ledger` (revert, export-model), so both follow one protocol:

- open: the ledger's commits become `CommitRef`s; the history checks the genesis fits the loaded model,
  removes orphaned artefacts and rebuilds the ledger's current version, verifying its hash;
- revert (exact): resolve the target in the ledger, check its artefacts can rebuild it, stage and
  verify it, then one ledger transaction (audit row, fact states, weights restored), then publish;
- pending reverts: a revert filed in the ledger while the daemon runs (by the CLI) is carried out by
  the daemon between batches and marked as restored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from editing.model.loading import LoadedModel
from editing.model.targets import default_edit_modules
from editing.state.history import CommitRef, EditorStateHolder, ModelHistory, RecoveryReport
from editing.state.weights import WeightState
from store import commits
from store.artefacts import ArtefactKind, ArtefactStore
from store.db import serialise_writers
from store.errors import UnknownVersion
from store.retention import chain_to, plan_rebuild

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RevertReport:
    """A revert carried out on the live weights."""

    revert_id: int
    from_version: int
    to_version: int
    reverted_commits: int
    reverted_facts: int
    weights_sha256: str
    seconds: float


def commit_refs(session: Session) -> dict[int, CommitRef]:
    """Every commit of the ledger (reverted ones too) as the history's `CommitRef`s."""
    return {
        version: CommitRef(version, parent, artefact, weights)
        for version, (parent, artefact, weights) in commits.commit_parents(session).items()
    }


def edited_modules(settings: Settings, loaded: LoadedModel) -> list[str]:
    """The configured edited modules, or the model family's defaults (`editing.model.targets`)."""
    return list(settings.model.edit_modules or default_edit_modules(loaded.model_type, loaded.num_layers))


def artefact_store(settings: Settings) -> ArtefactStore:
    return ArtefactStore(settings.artefact_dir())


def make_history(settings: Settings, loaded: LoadedModel, editor: EditorStateHolder | None = None) -> ModelHistory:
    """A history over freshly loaded base weights (nothing opened or recovered yet)."""
    return ModelHistory(
        WeightState(loaded.model, edited_modules(settings, loaded)),
        artefact_store(settings),
        editor=editor,
        fingerprint=loaded.fingerprint,
        earlier_fingerprints=loaded.earlier_fingerprints,
        snapshot_every=settings.store.snapshot_every,
        retention_commits=settings.store.retention_commits,
    )


def open_history(
    settings: Settings, loaded: LoadedModel, sessions: sessionmaker[Session], editor: EditorStateHolder | None = None
) -> tuple[ModelHistory, RecoveryReport]:
    """Open the model state of `settings.state_dir` on the freshly loaded base model and recover it.

    Afterwards the live weights are the ledger's current version (hash verified). Reverts filed in the
    ledger whose weights were not restored yet are covered by this rebuild and marked restored, unless
    the ledger moved on during the rebuild (a revert filed meanwhile): `apply_pending_reverts` does them.
    Raises ModelMismatch (another model or module set), BeyondHorizon, ArtefactMissing/Corrupt or
    WeightsHashMismatch.
    """
    history = make_history(settings, loaded, editor)
    with sessions() as session:
        refs = commit_refs(session)
        current = commits.current_version(session)
    history.open(refs)
    report = history.recover(refs, current)
    with sessions.begin() as session:
        serialise_writers(session)
        # Only while the ledger is still at the version just rebuilt: a revert filed during recovery (the
        # CLI, while the daemon holds the lock) is not covered by it and waits for apply_pending_reverts.
        if commits.current_version(session) == report.version:
            for revert in commits.unapplied_reverts(session):
                commits.mark_revert_applied(session=session, revert_id=revert.id)
    log.info(
        "model state recovered",
        version=report.version,
        snapshot=report.start,
        replayed=report.replayed,
        orphans_removed=len(report.removed),
    )
    return history, report


def revert_target(session: Session, *, to_version: int | None, last: int | None) -> int:
    """The version a revert `--to VERSION` or `--last N` goes to; UnknownVersion when it is not possible."""
    if to_version is not None:
        commits.check_revert_target(session, to_version)
        return to_version
    count = 1 if last is None else last
    chain = commits.active_versions(session)
    if count < 1:
        raise UnknownVersion(f"--last needs a count of at least 1, got {count}")
    if count > len(chain):
        raise UnknownVersion(f"cannot revert the last {count} commits: only {len(chain)} are active")
    return [*chain, 0][count]


def check_rebuildable(store: ArtefactStore, session: Session, version: int) -> None:
    """Raise BeyondHorizon when the artefacts left can no longer rebuild `version` (no model needed)."""
    parents = {v: parent for v, (parent, _, _) in commits.commit_parents(session).items()}
    try:
        chain = chain_to(version, parents)
    except Exception as exc:  # BrokenChain: the ledger's own check names the problem better
        raise UnknownVersion(f"cannot revert to version {version}: {exc}") from None
    plan_rebuild(chain, store.versions(ArtefactKind.SNAPSHOT), store.versions(ArtefactKind.COMMIT))


def revert_model(
    history: ModelHistory,
    sessions: sessionmaker[Session],
    *,
    to_version: int | None,
    last: int | None,
    reason: str | None,
    requested_by: str,
) -> RevertReport:
    """Exact revert of the live weights and the ledger together (the caller is the model's one writer).

    Raises UnknownVersion (not on the active chain), BeyondHorizon (artefacts pruned) before anything
    changes; WeightsHashMismatch if the published weights do not hash as recorded.
    """
    began = time.perf_counter()
    with sessions() as session:
        target = revert_target(session, to_version=to_version, last=last)
        refs = commit_refs(session)
        if history.state.version != commits.current_version(session):
            raise UnknownVersion(
                f"the live weights are at version {history.state.version} but the ledger at "
                f"{commits.current_version(session)}; apply pending reverts first"
            )
    done: dict[str, int] = {}

    def record() -> None:
        with sessions.begin() as session:
            audit = commits.revert_to(session=session, to_version=target, reason=reason, requested_by=requested_by)
            commits.mark_revert_applied(session=session, revert_id=audit.id)
            done.update(
                id=audit.id,
                from_version=audit.from_version,
                reverted_commits=audit.reverted_commits,
                reverted_facts=audit.reverted_facts,
            )

    history.revert_to(target, refs, record=record)
    outcome = RevertReport(
        revert_id=done["id"],
        from_version=done["from_version"],
        to_version=target,
        reverted_commits=done["reverted_commits"],
        reverted_facts=done["reverted_facts"],
        weights_sha256=history.state.weights_sha256(),
        seconds=time.perf_counter() - began,
    )
    log.info(
        "reverted", **{k: v for k, v in outcome.__dict__.items() if k != "weights_sha256"}, requested_by=requested_by
    )
    return outcome


def apply_pending_reverts(history: ModelHistory, sessions: sessionmaker[Session]) -> list[int]:
    """Carry out reverts filed in the ledger (e.g. by the CLI) on the live weights; returns their ids.

    The ledger already moved the facts; this rebuilds its current version, verifies the hash, publishes
    it and marks the reverts restored in one transaction. Call between batches, as the model's writer.
    """
    with sessions() as session:
        pending = [revert.id for revert in commits.unapplied_reverts(session)]
        if not pending:
            return []
        refs = commit_refs(session)
        current = commits.current_version(session)

    def record() -> None:
        with sessions.begin() as session:
            for revert_id in pending:
                commits.mark_revert_applied(session=session, revert_id=revert_id)

    if current == history.state.version:
        record()
    else:
        history.revert_to(current, refs, record=record)
    log.info("reverts applied", reverts=pending, version=current)
    return pending
