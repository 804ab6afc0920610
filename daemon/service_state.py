"""The running service's state in one place, and the names of its states and outcomes.

`ServiceState` holds what the daemon is doing: the editor's state (and training progress), whether
editing is paused and why, whether it is stopping, and how far the live model is from the base model
by the gate's own measurement. The service (editor loading and training, stopping) and the edit loop
(pauses, drift) write it; the HTTP API (`daemon.view`) and the metrics (`daemon.metrics`, at scrape
time) read it. Nothing is copied from one to the other by hand.

Reads return one `ServiceSnapshot`, a frozen value that writers replace whole under a lock, so a
reader on one of the API's threads never sees half an update (a pause without its reason, say).

The enums name the states and outcomes the service reports: metric labels, API fields, log lines.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, replace
from typing import Any


class EditorState(enum.StrEnum):
    """Where the editor (the trained hypernetwork) is; the edit loop edits only when it is `ready`."""

    MISSING = "missing"  #: no checkpoint (not trained yet, training stopped, or training not allowed)
    TRAINING = "training"  #: first run: an editor is being trained in the background
    READY = "ready"  #: loaded and attached to the edit loop
    FAILED = "failed"  #: the checkpoint cannot be used, or training failed (the detail says why)


class BatchOutcome(enum.StrEnum):
    """What became of one edit batch."""

    COMMITTED = "committed"  #: the gate passed some or all of its facts and they are the new live version
    REJECTED = "rejected"  #: nothing committed; at least one fact harms specificity on its own
    FAILED = "failed"  #: nothing committed; the edit raised, or every fact is out of retries
    ROLLED_BACK = "rolled_back"  #: nothing committed; the facts wait for another try (stop, retry, deferral)


class BatchPhase(enum.StrEnum):
    """The timed phases of an edit batch."""

    CLAIM = "claim"  #: taking pending facts from the ledger
    PREPARE = "prepare"  #: preparing the commit's artefact (the edit loop times it within `edit`)
    EDIT = "edit"  #: the editor's proposals, every try of the gate's included
    GATE = "gate"  #: the gate's measurements
    COMMIT = "commit"  #: artefact, ledger transaction, publishing the weights
    RESTORE = "restore"  #: putting back the weights before the batch (timed within `edit` and `gate`)


class RevertOutcome(enum.StrEnum):
    """What became of one revert request."""

    DONE = "done"  #: ledger and live weights are at the target version
    REFUSED = "refused"  #: the ledger or the artefacts refused it before anything changed
    FAILED = "failed"  #: a revert filed in the ledger could not be applied to the weights (editing pauses)


@dataclass(frozen=True)
class TrainingProgress:
    """The first run's editor training: batches done of all, and the latest training loss."""

    step: int
    total: int
    loss: float | None = None

    @property
    def ratio(self) -> float:
        return min(max(self.step / self.total, 0.0), 1.0) if self.total > 0 else 0.0


@dataclass(frozen=True)
class GateDrift:
    """How far the live model is from the frozen base model, as the gate measured it for the live version.

    The figures of the final try of the commit that made `version` (top-1 agreement and mean KL of
    next-token distributions on the batch's standing and locality prompts), the same numbers the
    gate's cumulative budget (`min_agreement`, `max_kl`) holds every batch to. Version 0 is the base
    model itself: agreement 1, KL 0.
    """

    version: int
    agreement: float
    mean_kl: float


BASE_MODEL_DRIFT = GateDrift(version=0, agreement=1.0, mean_kl=0.0)


@dataclass(frozen=True)
class ServiceSnapshot:
    """The service's state at one moment (see the module docstring)."""

    editor: EditorState = EditorState.MISSING
    editor_detail: str | None = "not loaded yet"
    training: TrainingProgress | None = None
    pause_reason: str | None = None  #: set while editing is paused
    stopping: bool = False
    drift: GateDrift | None = None  #: None until known (no gate run recorded for the live version)

    @property
    def paused(self) -> bool:
        """Editing is paused; queries, ingestion and reverts go on."""
        return self.pause_reason is not None

    @property
    def training_ratio(self) -> float:
        """Share of the editor's training done: 1 once the editor is ready."""
        if self.editor is EditorState.READY:
            return 1.0
        return self.training.ratio if self.training is not None else 0.0


class ServiceState:
    """The service's state, shared by its threads (see the module docstring). Every method is cheap and thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = ServiceSnapshot()

    def now(self) -> ServiceSnapshot:
        """The state at this moment, consistent in itself."""
        return self._now

    def _update(self, **changes: Any) -> ServiceSnapshot:
        """Apply `changes` and return the snapshot they replaced."""
        with self._lock:
            before = self._now
            self._now = replace(before, **changes)
            return before

    def set_editor(self, state: EditorState, detail: str | None = None) -> None:
        """The editor's state and what a person should know about it (why it failed, where it trains)."""
        self._update(editor=state, editor_detail=detail)

    def observe_training(self, *, step: int, total: int, loss: float | None = None) -> None:
        """Progress of the first run's editor training."""
        self._update(
            training=TrainingProgress(step, total, loss), editor_detail=f"first run: training batch {step} of {total}"
        )

    def pause(self, reason: str) -> bool:
        """Pause editing for `reason`; True when editing was running until now."""
        return not self._update(pause_reason=reason).paused

    def resume(self) -> bool:
        """Resume editing; True when it was paused until now."""
        return self._update(pause_reason=None).paused

    def stop(self) -> None:
        """The service is shutting down."""
        self._update(stopping=True)

    def set_drift(self, drift: GateDrift | None) -> None:
        """The gate's measurement of the live version against the base model (None: not known)."""
        self._update(drift=drift)
