"""One edit batch through the commit gate on the live weights: propose, gate, hand back what to commit.

`GatedEditor.edit(facts)` is the unit of work of the service's edit loop (and of the gate benchmark).
It holds the weights' write lock while it works, because proposing and measuring change the model's
weights in place for a moment; queries wait rather than see a half-applied edit. It always leaves
the model exactly as it found it (bit-identical), whatever happens: committing the result is the
caller's business (`ModelHistory.commit` with `BatchResult.prepared`).

Exactness: every try of the gate applies the *canonical* deltas of `prepare_commit` (decoded from their
storage encoding) onto the float32 masters with the same float32 add that publishing uses, so the
weights the gate measured are bit-identical to the weights a commit of the same facts publishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

from editing.engine.deltas import EditPlan, apply, restore, snapshot
from editing.engine.emsedit import EMSEditor
from editing.gate.checks import BatchChecker, BatchMeasurement, Gate, GateFact, GateVerdict, locality_prompts
from editing.gate.frozen_layers import FrozenLayers
from editing.model.tokenise import pad_id
from editing.state.history import PreparedCommit, prepare_commit
from editing.state.weights import WeightState

logger = logging.getLogger(__name__)


class EditInterrupted(Exception):
    """`should_stop` said stop between two tries of the gate; the model is back to the pre-batch weights."""


@dataclass(frozen=True)
class BatchResult:
    """The gate's verdict on a batch and, when any fact commits, the prepared commit of exactly those facts."""

    verdict: GateVerdict
    prepared: PreparedCommit | None
    plan: EditPlan | None  #: the editor's plan behind `prepared` (diagnostics: losses, norms)
    phases: dict[str, float] = field(default_factory=dict)  #: seconds: propose, encode, check

    @property
    def edit_seconds(self) -> float:
        return self.phases.get("propose", 0.0) + self.phases.get("encode", 0.0)


@dataclass
class _Try:
    plan: EditPlan | None = None
    prepared: PreparedCommit | None = None
    keys: tuple[object, ...] = ()


class GatedEditor:
    """Edits batches of facts on `state`'s model with `editor`, each try measured by `checker` for `gate`."""

    def __init__(self, editor: EMSEditor, state: WeightState, gate: Gate, checker: BatchChecker) -> None:
        if set(editor.module_names) != set(state.module_names):
            raise ValueError(
                f"the editor edits {editor.module_names} but the weight state tracks {state.module_names}"
            )
        self.editor = editor
        self.state = state
        self.gate = gate
        self.checker = checker
        #: the lower layers' cache of the checks (`editing.gate.frozen_layers`); set up on the first batch
        self.frozen: FrozenLayers | None = None
        self._frozen_checked = False

    def _frozen_layers(self) -> FrozenLayers | None:
        """The checks' cache of the layers below the edited ones, verified once on this model (under the lock).

        None when the cache is off, nothing lies below the edited modules, or the model's stack does not
        fit the upper-layers pass (then every check runs the whole model, as it would without the cache).
        """
        if not self._frozen_checked:
            self._frozen_checked = True
            frozen = FrozenLayers.locate(
                self.editor.model, self.state.module_names, self.checker.config.frozen_layer_cache_tokens
            )
            if frozen is not None:
                problem = frozen.verify(self.editor.model, pad_id(self.editor.tokenizer))
                if problem is not None:
                    logger.warning("the gate runs every layer for its checks: %s", problem)
                    frozen = None
            self.frozen = frozen
        return self.frozen

    def edit(
        self,
        facts: Sequence[GateFact],
        *,
        pre_batch: BatchMeasurement | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> BatchResult:
        """Run the gate on `facts` (see `editing.gate.checks`); the model is unchanged afterwards.

        `should_stop` is asked before every try (isolation may take many); when it says stop, the
        batch is abandoned with EditInterrupted. Raises whatever the editor raises (e.g. a
        tokenisation error), after restoring the weights.
        """
        model, tokenizer = self.editor.model, self.editor.tokenizer
        names = self.state.module_names
        extra = locality_prompts(facts)
        phases = {"propose": 0.0, "encode": 0.0, "check": 0.0}
        last = _Try()
        with self.state.writing():
            frozen = self._frozen_layers()
            masters = self.state.masters()
            saved = snapshot(model, names)
            # the model's answers on the protected facts before the batch: what every try must keep
            before = self.checker.protected_answers(model, tokenizer)
            protected = (self.checker.protected, before) if self.checker.protected and before is not None else None

            def try_batch(subset: Sequence[GateFact]) -> BatchMeasurement:
                if should_stop is not None and should_stop():
                    raise EditInterrupted("stop requested while the batch was being edited")
                restore(model, saved)
                last.plan, last.prepared, last.keys = None, None, tuple(f.key for f in subset)
                if subset:
                    began = time.perf_counter()
                    examples, strengths = [f.example for f in subset], [f.strength for f in subset]
                    # The editor runs the model on the facts' prompt + answer rows, which are the efficacy
                    # rows of the check: their lower layers are recorded on the way.
                    with frozen.recording(model) if frozen is not None else nullcontext():
                        plan = self.editor.propose(
                            examples, masters, strengths=strengths if any(s != 1.0 for s in strengths) else None
                        )
                    phases["propose"] += time.perf_counter() - began
                    began = time.perf_counter()
                    prepared = prepare_commit(plan.deltas, plan.editor_state)
                    phases["encode"] += time.perf_counter() - began
                    # A shallow copy: `apply` rebinds the entries, the live masters stay untouched.
                    apply(model, prepared.deltas, dict(masters))
                    last.plan, last.prepared = plan, prepared
                began = time.perf_counter()
                measured = self.checker.measure(model, tokenizer, subset, extra, frozen)
                phases["check"] += time.perf_counter() - began
                return measured

            def measure_pre_batch() -> BatchMeasurement:
                # the model before the batch, then back to the last try's weights (same add, bit-identical)
                restore(model, saved)
                began = time.perf_counter()
                measured = self.checker.measure(model, tokenizer, [], extra, frozen)
                phases["check"] += time.perf_counter() - began
                if last.prepared is not None:
                    apply(model, last.prepared.deltas, dict(masters))
                return measured

            try:
                verdict = self.gate.decide(facts, try_batch, pre_batch=pre_batch or measure_pre_batch, protected=protected)
            finally:
                restore(model, saved)
        committed = verdict.committed
        if not committed:
            return BatchResult(verdict, None, None, phases)
        # The gate's invariant: the last try was exactly the committed facts, in input order.
        if last.keys != committed or last.prepared is None:
            raise AssertionError(f"the gate's last try {last.keys} is not its committed set {committed}")
        return BatchResult(verdict, last.prepared, last.plan, phases)
