"""The versioned model state: the crash-safe commit protocol, rebuilds, exact reverts, recovery, consolidation.

`ModelHistory` joins the live `WeightState`, the `ArtefactStore` and the editor's edit state (normaliser
statistics and edit memory). The ledger stays with the caller, passed in as callables and as `CommitRef`s (what the
ledger knows about each commit); docs/model-state.md describes the wiring.

Commit protocol (`commit`), each step durable before the next starts:
  1. artefact: encoded deltas + editor state -> temporary file, fsync, rename, fsync of the directory;
  2. `record(CommitRecord)`: the caller's ledger transaction (commit row with the artefact's sha256 and
     the weights hash, fact states); it raises if it did not commit, and the artefact is then removed;
  3. publish: the new weights and editor state, under the write lock.
A crash before 2 leaves an orphan artefact (recovery removes it, the facts go back to pending); a
crash after 2 leaves a durable commit that recovery rebuilds. Reverts stage and verify the target
state first, then record, then publish, so a refused or failed revert changes nothing.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from editing.engine.edit_memory import replayed_state, stored_state
from editing.errors import ModelMismatch
from editing.state.lowrank import DeltaCodecStats, decode_delta, encode_deltas
from editing.state.weights import StagedWeights, WeightsHashMismatch, WeightState
from store.artefacts import RESERVED_KEYS, ArtefactCorrupt, ArtefactKind, ArtefactStore
from store.retention import BeyondHorizon, RebuildPlan, chain_to, horizon, plan_pruning, plan_rebuild, snapshot_due

CODEC = "lowrank-int16-v1"
COMMIT, SNAPSHOT = ArtefactKind.COMMIT, ArtefactKind.SNAPSHOT


class EditorStateHolder(Protocol):
    """What the history needs of the editor (EMSEditor has both): the state an edit changes."""

    def edit_state(self) -> dict[str, torch.Tensor]: ...

    def load_edit_state(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class CommitRef:
    """What the ledger records about one commit: the truth that rebuilds follow and check against."""

    version: int
    parent: int
    artefact_sha256: str | None = None
    weights_sha256: str | None = None


class CommitStep(enum.StrEnum):
    """Points of the commit protocol, in order, reported to an observer (logs, metrics, crash tests)."""

    ARTEFACT_TEMP_WRITTEN = "artefact-temp-written"  #: temporary file durable, not yet renamed
    ARTEFACT_DURABLE = "artefact-durable"  #: renamed and directory fsynced
    LEDGER_RECORDED = "ledger-recorded"  #: the caller's transaction committed
    PUBLISHED = "published"  #: the query path sees the new weights


@dataclass(frozen=True)
class PreparedCommit:
    """An edit made storable: `deltas` are the canonical ones (decoded from `encoded`): gate these."""

    encoded: dict[str, dict[str, torch.Tensor]]
    deltas: dict[str, torch.Tensor]
    editor_state: dict[str, torch.Tensor]
    stats: dict[str, DeltaCodecStats]

    @property
    def stored_bytes(self) -> int:
        return sum(s.stored_bytes for s in self.stats.values())


@dataclass(frozen=True)
class CommitRecord:
    """What the caller's ledger transaction must record for a commit (`store.records.CommitIn` fields)."""

    version: int
    parent: int
    artefact_path: str
    artefact_sha256: str
    artefact_bytes: int
    weights_sha256: str


@dataclass(frozen=True)
class RecoveryReport:
    """What `recover` did: the version rebuilt, from which snapshot, how many commits replayed, files removed."""

    version: int
    start: int
    replayed: int
    removed: tuple[Path, ...]


@dataclass(frozen=True)
class ConsolidationReport:
    """What `consolidate` did: the snapshot written (if any), the horizon after pruning, versions removed."""

    snapshot: int | None
    horizon: int
    removed_commits: tuple[int, ...] = ()
    removed_snapshots: tuple[int, ...] = ()


@dataclass
class _Replay:
    """The editor state seen last while replaying commits (a commit with frozen statistics stores none)."""

    editor_state: dict[str, torch.Tensor] = field(default_factory=dict)


def prepare_commit(deltas: Mapping[str, torch.Tensor], editor_state: Mapping[str, torch.Tensor]) -> PreparedCommit:
    """Encode an edit's float32 (in, out) deltas for storage; the result's canonical `deltas` are what gets committed."""
    encoded, canonical, stats = encode_deltas(deltas)
    return PreparedCommit(encoded, canonical, {k: v.detach().clone() for k, v in editor_state.items()}, stats)


def _split(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


class ModelHistory:
    """Versioned state of one model's edited modules (see the module docstring for the protocols).

    `snapshot_every`: consolidate the cumulative state into a snapshot after this many commits of the
    active chain (0: never). `retention_commits`: keep the newest this many commits revertable and
    prune older artefacts (None: keep everything).
    """

    def __init__(
        self,
        state: WeightState,
        store: ArtefactStore,
        *,
        editor: EditorStateHolder | None = None,
        fingerprint: str | None = None,
        earlier_fingerprints: Sequence[str] = (),
        snapshot_every: int = 25,
        retention_commits: int | None = 200,
    ) -> None:
        self.state = state
        self.store = store
        self.editor = editor
        self.fingerprint = fingerprint
        # what earlier versions of this code called the same model: their state directories stay usable
        self.earlier_fingerprints = tuple(earlier_fingerprints)
        self.snapshot_every = snapshot_every
        self.retention_commits = retention_commits
        self._editor_state: dict[str, torch.Tensor] = editor.edit_state() if editor else {}

    def open(self, refs: Mapping[int, CommitRef]) -> None:
        """Write the genesis (version 0) while the ledger has no commit; otherwise check it fits this model.

        Call at start-up, after creating the state from the freshly loaded base model and before `recover`.
        Raises ModelMismatch when the state directory was made for another model or other edited modules.
        """
        base = self.state.stage(0, [])
        if refs and self.store.exists(SNAPSHOT, 0):
            self._check_genesis(base)
            return
        self.store.remove(SNAPSHOT, 0)
        metadata = self._metadata(base) | {"fingerprint": self.fingerprint or ""}
        self.store.write(SNAPSHOT, 0, self._editor_tensors(self._editor_state), metadata)

    def attach_editor(self, editor: EditorStateHolder) -> None:
        """Give the history its editor once it exists (after `open`/`recover`; e.g. after first-run training).

        The editor takes the statistics the live version was recovered with. When no artefact held any
        (nothing was committed with this editor yet), the editor's own statistics become the genesis's,
        so that a revert to version 0 also restores them exactly.
        """
        self.editor = editor
        if self._editor_state:
            editor.load_edit_state(dict(self._editor_state))
            return
        self._editor_state = editor.edit_state()
        genesis = self.store.read(SNAPSHOT, 0)
        if not _split(genesis.tensors, "editor/"):
            tensors = dict(genesis.tensors) | self._editor_tensors(self._editor_state)
            metadata = {k: v for k, v in genesis.metadata.items() if k not in RESERVED_KEYS}
            # A crash between the two leaves no genesis; `open` writes it again from the base weights.
            self.store.remove(SNAPSHOT, 0)
            self.store.write(SNAPSHOT, 0, tensors, metadata)

    def _check_genesis(self, base: StagedWeights) -> None:
        meta = self.store.metadata(SNAPSHOT, 0)
        if json.loads(meta["modules"]) != self.state.module_names:
            raise ModelMismatch(
                f"the state directory's edits were made on modules {meta['modules']}, not {self.state.module_names}; "
                "use the same [model] edit_modules, or another state directory"
            )
        stored = meta.get("fingerprint")
        if self.fingerprint and stored and stored != self.fingerprint and stored not in self.earlier_fingerprints:
            raise ModelMismatch(
                "the state directory's edits were made on another base model (fingerprint "
                f"{meta['fingerprint'][:16]}…, loaded {self.fingerprint[:16]}…); load that model or use another state directory"
            )
        if meta["weights_sha256"] != base.weights_sha256:
            raise ModelMismatch("the loaded base weights of the edited modules differ from those the edits were made on")

    def _metadata(self, staged: StagedWeights) -> dict[str, str]:
        return {
            "modules": json.dumps(self.state.module_names),
            "dtype": str(self.state.dtype),
            "weights_sha256": staged.weights_sha256,
            "masters_sha256": staged.masters_sha256,
        }

    @staticmethod
    def _editor_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"editor/{key}": value for key, value in state.items()}

    def commit(
        self,
        prepared: PreparedCommit,
        *,
        version: int,
        record: Callable[[CommitRecord], None],
        observer: Callable[[CommitStep], None] | None = None,
    ) -> CommitRecord:
        """Run the commit protocol for `prepared` as `version` on top of the live version.

        `version` is the number the ledger will give the commit (one above the highest ever used).
        `record` runs the ledger transaction and must raise if it did not commit (e.g. when the
        ledger assigned another version); the artefact is then removed and the live state is unchanged.
        """
        notify = observer or (lambda step: None)
        parent = self.state.version
        if version <= parent:
            raise ValueError(f"commit version {version} must be above the live version {parent}")
        staged = self.state.stage_commit(version, prepared.deltas)
        tensors = {f"delta/{m}/{part}": t for m, parts in prepared.encoded.items() for part, t in parts.items()}
        # the edit memory's Grams are rebuilt on replay from each commit's keys (editing/engine/edit_memory.py)
        tensors |= self._editor_tensors(stored_state(prepared.editor_state))
        metadata = self._metadata(staged) | {"parent": str(parent), "codec": CODEC}
        info = self.store.write(
            COMMIT, version, tensors, metadata, on_temp_written=lambda: notify(CommitStep.ARTEFACT_TEMP_WRITTEN)
        )
        notify(CommitStep.ARTEFACT_DURABLE)
        assert info.sha256 is not None
        result = CommitRecord(version, parent, str(info.path), info.sha256, info.size_bytes, staged.weights_sha256)
        try:
            record(result)
        except BaseException:
            self.store.remove(COMMIT, version)
            raise
        notify(CommitStep.LEDGER_RECORDED)
        self._publish(staged, prepared.editor_state or None)
        notify(CommitStep.PUBLISHED)
        return result

    def _publish(self, staged: StagedWeights, editor_state: dict[str, torch.Tensor] | None) -> None:
        with self.state.writing():
            self.state.publish(staged)
            if editor_state is not None:
                self._editor_state = dict(editor_state)
                if self.editor is not None:
                    self.editor.load_edit_state(dict(editor_state))

    def stage_version(
        self, version: int, refs: Mapping[int, CommitRef]
    ) -> tuple[StagedWeights, dict[str, torch.Tensor], RebuildPlan]:
        """Rebuild `version` from the artefacts (nothing published) and check it against the recorded hashes.

        Raises BeyondHorizon (pruned), ArtefactMissing / ArtefactCorrupt, or WeightsHashMismatch.
        """
        chain = chain_to(version, {v: r.parent for v, r in refs.items()})
        plan = plan_rebuild(chain, self.store.versions(SNAPSHOT), self.store.versions(COMMIT))
        start_art = self.store.read(SNAPSHOT, plan.start)
        replay = _Replay(_split(start_art.tensors, "editor/"))
        start = _split(start_art.tensors, "master/") if plan.start else None
        masters = self.state.replay(self._deltas(plan, refs, replay), start)
        staged = self.state.staged(version, masters)
        expected = refs[version].weights_sha256 if version else start_art.metadata["weights_sha256"]
        if expected and staged.weights_sha256 != expected:
            raise WeightsHashMismatch(
                f"version {version} rebuilt from {'snapshot ' + str(plan.start) if plan.start else 'the base'} and "
                f"{len(plan.commits)} commits hashes to {staged.weights_sha256[:16]}…, but {expected[:16]}… was recorded"
            )
        last = self.store.metadata(COMMIT, version) if plan.commits else start_art.metadata
        if last.get("masters_sha256") not in (None, staged.masters_sha256):
            raise WeightsHashMismatch(f"the float32 masters of version {version} differ from those recorded at commit")
        return staged, replay.editor_state, plan

    def _deltas(
        self, plan: RebuildPlan, refs: Mapping[int, CommitRef], replay: _Replay
    ) -> Iterator[dict[str, torch.Tensor]]:
        for version in plan.commits:
            ref = refs[version]
            art = self.store.read(COMMIT, version, expected_sha256=ref.artefact_sha256)
            if art.metadata.get("parent") != str(ref.parent) or art.metadata.get("codec") != CODEC:
                raise ArtefactCorrupt(
                    f"{art.info.path} was written for parent {art.metadata.get('parent')} with codec "
                    f"{art.metadata.get('codec')}; the ledger says parent {ref.parent}, codec {CODEC}"
                )
            replay.editor_state = replayed_state(replay.editor_state, _split(art.tensors, "editor/"))
            parts = _split(art.tensors, "delta/")
            grouped: dict[str, dict[str, torch.Tensor]] = {}
            for key, tensor in parts.items():
                module, _, part = key.rpartition("/")
                grouped.setdefault(module, {})[part] = tensor
            yield {module: decode_delta(p) for module, p in grouped.items()}

    def revert_to(
        self, version: int, refs: Mapping[int, CommitRef], *, record: Callable[[], None]
    ) -> RebuildPlan:
        """Exact revert: rebuild and verify `version`, then `record()` (the ledger revert), then publish.

        A target beyond the retention horizon raises BeyondHorizon before `record` is called.
        After publishing, the live weights are checked against the recorded hash.
        """
        try:
            staged, editor_state, plan = self.stage_version(version, refs)
        except BeyondHorizon as exc:
            raise beyond_horizon(
                "revert to", version, self.horizon(refs), self.retention_commits, self.snapshot_every, exc
            ) from None
        record()
        self._publish(staged, editor_state or None)
        self.state.verify(staged.weights_sha256, f"revert to version {version}")
        return plan

    def recover(self, refs: Mapping[int, CommitRef], current: int) -> RecoveryReport:
        """Start-up: remove orphaned artefacts, rebuild the last durable commit `current`, verify, publish.

        `refs` must list every commit in the ledger (reverted ones too); `current` is the ledger's
        current version. The caller also moves facts left in `editing` back to `pending`.
        """
        removed = self.store.remove_orphans(refs.keys())
        staged, editor_state, plan = self.stage_version(current, refs)
        self._publish(staged, editor_state or None)
        self.state.verify(staged.weights_sha256, f"recovery of version {current}")
        return RecoveryReport(current, plan.start, len(plan.commits), tuple(removed))

    def consolidate(self, refs: Mapping[int, CommitRef]) -> ConsolidationReport:
        """Snapshot the live state when one is due, then prune artefacts beyond the retention horizon.

        Call between batches (the live version must be the ledger's current version).
        """
        chain = chain_to(self.state.version, {v: r.parent for v, r in refs.items()})
        snapshots = self.store.versions(SNAPSHOT)
        written = None
        if snapshot_due(chain, snapshots, self.snapshot_every):
            written = self.write_snapshot()
            snapshots.add(written)
        pruning = plan_pruning(chain, snapshots, self.store.versions(COMMIT), self.retention_commits)
        for version in pruning.commits:
            self.store.remove(COMMIT, version)
        for version in pruning.snapshots:
            self.store.remove(SNAPSHOT, version)
        return ConsolidationReport(written, pruning.anchor, pruning.commits, pruning.snapshots)

    def write_snapshot(self) -> int:
        """Write the live state (float32 masters and editor state) as the snapshot of its version."""
        with self.state.reading() as version:
            masters = self.state.masters()
            staged = self.state.staged(version, masters)
            tensors = {f"master/{name}": t for name, t in masters.items()} | self._editor_tensors(self._editor_state)
        self.store.write(SNAPSHOT, version, tensors, self._metadata(staged))
        return version

    def horizon(self, refs: Mapping[int, CommitRef]) -> int:
        """The oldest version of the active chain that a revert can still reach."""
        return reachable_horizon(self.store, refs, self.state.version)


def reachable_horizon(store: ArtefactStore, refs: Mapping[int, CommitRef], version: int) -> int:
    """The oldest version of the chain to `version` that the artefacts in `store` can still rebuild (no model needed)."""
    chain = chain_to(version, {v: r.parent for v, r in refs.items()})
    return horizon(chain, store.versions(SNAPSHOT), store.versions(COMMIT))


def beyond_horizon(
    action: str, version: int, oldest: int, retention_commits: int | None, snapshot_every: int, cause: Exception
) -> BeyondHorizon:
    """The refusal of `action` ("revert to", "export") on a version the retention policy consolidated away."""
    return BeyondHorizon(
        f"cannot {action} version {version}: it is beyond the retention horizon; the oldest version that can still "
        f"be rebuilt is {oldest} (store.retention_commits = {retention_commits}, store.snapshot_every = "
        f"{snapshot_every}). Older artefacts were consolidated and removed. Nothing was changed. ({cause})"
    )
