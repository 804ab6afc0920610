"""The per-batch commit gate: measure an edited batch, decide what commits, isolate harmful facts.

`BatchChecker.measure` scores the live (edited) model: efficacy of each fact (teacher-forced token
accuracy of its target on its prompt, spec §8.1) and specificity against the frozen base model on the
standing prompts plus the batch's locality prompts (`editing.gate.specificity`).

`Gate.decide` drives a caller-supplied `try_batch(facts) -> BatchMeasurement`, which restores the
pre-batch weights, edits exactly `facts` (none: leaves the pre-batch state) and measures.

Specificity passes when both budgets hold (`editing.gate.config`): the cumulative one (agreement and
KL against the frozen base) and the per-batch one (what this batch changed). The per-batch budget is
first checked against the base, which needs no extra pass; only when that fails is the model before the
batch measured once (lazily, on the same prompts) and the try compared with it (`marginal`). Algorithm:

1. Try the whole batch. If specificity passes, go to 3.
2. Specificity fails. If the pre-batch state already fails the cumulative budget, the batch is not to
   blame: every fact is deferred and the verdict is `blocked` (the drift policy's business). Otherwise bisect: a failing set
   of more than one fact is split in halves, each re-edited from the pre-batch state and measured; a
   failing half is bisected further, a passing half is clean, a failing single fact is rejected with its
   numbers if its own change breaks the per-batch budget, and deferred otherwise (it is harmless, but
   the cumulative budget has no room left; when no fact commits, the verdict is `blocked`). When both
   halves pass but their union fails (harm that only adds up), the half with the larger harm is sent
   back for a later batch. With k harmful facts among n this costs at most 2·k·⌈log2 n⌉ re-edits.
3. Facts whose efficacy is below the threshold leave the batch: retried later (up to
   `efficacy_retries` times), then failed. The remaining facts are re-edited and re-checked (back to 2).

Protected facts (`editing.gate.protected`): with a `ProtectedCheck`, every try also records the model's
answers on the protected facts, and a try that changes one fails like a harmful one, before the
specificity budgets are looked at; isolation rejects the single fact that changes one, with the reason
naming the protected fact (`PROTECTED_REASON`).

Invariant: when the verdict commits any facts, the last `try_batch` call was with exactly those facts in
input order, so an editor that leaves its last try applied holds the state to commit, and
`verdict.final` is its measurement. Every outcome carries its reason and the measured numbers, and
every record is JSON-ready (`to_dict`) for the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from editing.data import EditExample
from editing.gate.config import GateConfig
from editing.gate.frozen_layers import FrozenLayers
from editing.gate.protected import Answers, ProtectedCheck, no_grad_answers
from editing.gate.specificity import (
    ReferenceStore,
    SpecificityCheck,
    SpecificityResult,
    compare_distributions,
    standing_prompts,
)
from editing.model.scoring import answer_scores

FactKey = int | str
Status = Literal["committed", "rejected", "retry", "failed", "deferred"]
#: How the reason of a fact rejected for changing a protected fact begins.
PROTECTED_REASON = "changes the model's answer to a protected fact"


@dataclass(frozen=True)
class GateFact:
    """A fact in an edit batch: the ledger's key, the example to edit and how often it was tried before."""

    key: FactKey
    example: EditExample
    attempts: int = 0
    strength: float = 1.0  #: weight of its edit signal (raised when it failed efficacy before)


def locality_prompts(facts: Sequence[GateFact]) -> list[str]:
    """The distinct locality prompts of `facts`, in order: one specificity set for every subset of a batch."""
    return list(dict.fromkeys(prompt for fact in facts for prompt, _ in fact.example.locality))


@dataclass(frozen=True)
class BatchMeasurement:
    """What the gate measured on the model edited with `facts`."""

    facts: tuple[FactKey, ...]
    efficacy: Mapping[FactKey, float]  #: teacher-forced token accuracy of each fact's target
    specificity: SpecificityResult  #: against the frozen base model
    seconds: float  #: time spent measuring (not editing)
    marginal: SpecificityResult | None = None  #: against the model before the batch, when it was needed
    #: the live model's next-token log-probabilities on the specificity prompts (not recorded)
    logprobs: torch.Tensor | None = field(default=None, repr=False, compare=False)
    #: the model's answers on the protected facts (`editing.gate.protected`), when it has any
    protected: Answers | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "facts": list(self.facts),
            "efficacy": [{"fact": key, "efficacy": value} for key, value in self.efficacy.items()],
            "specificity": self.specificity.to_dict(),
            "seconds": self.seconds,
        }
        if self.marginal is not None:
            out["marginal"] = self.marginal.to_dict()
        return out

    def without_logprobs(self) -> BatchMeasurement:
        return replace(self, logprobs=None) if self.logprobs is not None else self


TryBatch = Callable[[Sequence[GateFact]], BatchMeasurement]
#: Measures the model before the batch and leaves the weights of the last try in place.
MeasurePreBatch = Callable[[], BatchMeasurement]


class BatchChecker:
    """Measures efficacy and specificity of the live model for one edit batch."""

    def __init__(self, config: GateConfig, specificity: SpecificityCheck, protected: ProtectedCheck | None = None) -> None:
        self.config = config
        self.specificity = specificity
        #: the protected facts every try is checked against (None or empty: none)
        self.protected = protected

    @classmethod
    def from_config(
        cls, config: GateConfig, references: ReferenceStore, protected: ProtectedCheck | None = None
    ) -> BatchChecker:
        """A checker on the first `specificity_prompts` standing prompts (and the protected facts, if any)."""
        standing = standing_prompts()[: config.specificity_prompts]
        return cls(config, SpecificityCheck(references, standing, config.batch_size), protected)

    def protected_answers(self, model: nn.Module, tokenizer: Any) -> Answers | None:
        """The model's answers on the protected facts now (None without any)."""
        if not self.protected:
            return None
        return no_grad_answers(self.protected, model, tokenizer)

    def measure(
        self,
        model: nn.Module,
        tokenizer: Any,
        facts: Sequence[GateFact],
        extra_prompts: Sequence[str] = (),
        frozen: FrozenLayers | None = None,
    ) -> BatchMeasurement:
        """Efficacy of `facts` and specificity on the standing prompts plus `extra_prompts`.

        Pass the same `extra_prompts` (e.g. `locality_prompts(batch)`) for every subset of one batch, so
        that all tries are measured on the same prompts. With `frozen` the layers below the edited ones
        are not run again for rows it has seen (`editing.gate.frozen_layers`).
        """
        started = time.perf_counter()
        efficacy: dict[FactKey, float] = {}
        if facts:
            prompts = [f.example.prompt for f in facts]
            targets = [f.example.target_new for f in facts]
            accuracy = answer_scores(
                model, tokenizer, prompts, targets, self.config.batch_size, frozen=frozen
            ).token_accuracy
            efficacy = {f.key: float(a) for f, a in zip(facts, accuracy.tolist(), strict=True)}
        extra = extra_prompts if self.config.use_locality_prompts else ()
        spec, live = self.specificity.measure_live(model, tokenizer, extra, frozen=frozen)
        protected = self.protected_answers(model, tokenizer) if facts else None
        return BatchMeasurement(
            tuple(f.key for f in facts), efficacy, spec, time.perf_counter() - started, logprobs=live,
            protected=protected,
        )


@dataclass(frozen=True)
class FactOutcome:
    """The gate's decision on one fact, with its reason and the numbers it was based on."""

    key: FactKey
    status: Status
    reason: str
    attempts: int  #: tries so far, this one included (retry counting)
    numbers: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fact": self.key,
            "status": self.status,
            "reason": self.reason,
            "attempts": self.attempts,
            "numbers": dict(self.numbers),
        }


@dataclass(frozen=True)
class GateVerdict:
    """The outcome of one batch: an outcome per fact (input order) and the measurements behind them."""

    outcomes: tuple[FactOutcome, ...]
    final: BatchMeasurement | None  #: measurement of exactly the committed facts (None if none commit)
    pre_batch: BatchMeasurement | None  #: the pre-batch state, when it had to be measured
    edits: int  #: try_batch calls that edited (the first edit included)
    seconds: float  #: wall time of the whole decision, edits included
    measure_seconds: float  #: time spent measuring, summed over all tries
    blocked: str | None = None  #: set when the model before the batch already fails specificity
    protected_checked: int = 0  #: protected facts checked on every try (0: none configured)

    @property
    def committed(self) -> tuple[FactKey, ...]:
        return tuple(o.key for o in self.outcomes if o.status == "committed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcomes": [o.to_dict() for o in self.outcomes],
            "final": self.final.to_dict() if self.final else None,
            "pre_batch": self.pre_batch.to_dict() if self.pre_batch else None,
            "edits": self.edits,
            "seconds": self.seconds,
            "measure_seconds": self.measure_seconds,
            "blocked": self.blocked,
            "protected_checked": self.protected_checked,
        }


def _numbers(measurement: BatchMeasurement, key: FactKey | None = None) -> dict[str, float]:
    out: dict[str, float] = {k: float(v) for k, v in measurement.specificity.to_dict().items()}
    if measurement.marginal is not None:
        out |= {f"batch_{k}": float(v) for k, v in measurement.marginal.to_dict().items() if k != "n_prompts"}
    if key is not None and key in measurement.efficacy:
        out["efficacy"] = measurement.efficacy[key]
    return out


def _failure(
    result: SpecificityResult, agreement_name: str, min_agreement: float, kl_name: str, max_kl: float, against: str
) -> str | None:
    problems = []
    if result.agreement < min_agreement:
        problems.append(f"agreement {result.agreement:.3f} < {agreement_name} {min_agreement}")
    if result.mean_kl > max_kl:
        problems.append(f"mean KL {result.mean_kl:.4f} > {kl_name} {max_kl}")
    if problems:
        problems.append(f"on {result.n_prompts} unrelated prompts, against {against}")
    return "; ".join(problems) or None


def _closeness(result: SpecificityResult, min_agreement: float, max_kl: float) -> float:
    disagreement = (1.0 - result.agreement) / max(1e-9, 1.0 - min_agreement)
    return max(disagreement, result.mean_kl / max(1e-12, max_kl))


class _BudgetExhausted(Exception):
    """Internal: the batch used up `max_isolation_edits`."""


class _Decision:
    """The state of one `Gate.decide` call: tries made, outcomes so far, the last try."""

    def __init__(
        self,
        gate: Gate,
        try_batch: TryBatch,
        measure_pre: MeasurePreBatch | None = None,
        protected: tuple[ProtectedCheck, Answers] | None = None,
    ) -> None:
        self.gate = gate
        self.protected = protected  #: the check and the model's answers before the batch
        self.try_batch = try_batch
        self.measure_pre = measure_pre
        self.pre: BatchMeasurement | None = None
        self.edits = 0
        self.measure_seconds = 0.0
        self.outcomes: dict[FactKey, FactOutcome] = {}
        self.last: tuple[tuple[FactKey, ...], BatchMeasurement] | None = None
        self.applied: tuple[FactKey, ...] | None = None  #: the facts the weights hold now (last try_batch)
        self.no_room: str | None = None  #: set when a fact harmless on its own found no cumulative budget

    def attempt(self, facts: Sequence[GateFact]) -> BatchMeasurement:
        """Re-edit `facts` from the pre-batch state and measure (budgeted)."""
        keys = tuple(f.key for f in facts)
        if self.last is not None and self.last[0] == keys:
            return self.last[1]
        if self.edits > self.gate.config.max_isolation_edits:
            raise _BudgetExhausted
        measurement = self.try_batch(list(facts))
        self.edits += 1
        self.measure_seconds += measurement.seconds
        self.last = (keys, measurement)
        self.applied = keys
        return measurement

    def measure_pre_batch(self) -> BatchMeasurement:
        """The state before the batch, measured once (not budgeted).

        With `measure_pre` the weights of the last try stay in place; otherwise it is an empty try.
        """
        if self.pre is not None:
            return self.pre
        if self.measure_pre is not None:
            measurement = self.measure_pre()
        else:
            measurement = self.try_batch([])
            self.last, self.applied = ((), measurement), ()
        self.measure_seconds += measurement.seconds
        self.pre = measurement
        return measurement

    def protected_failure(self, measured: BatchMeasurement) -> str | None:
        """Why a try changed a protected fact's answer (naming at most three), or None."""
        if self.protected is None or measured.protected is None:
            return None
        check, before = self.protected
        changed = check.changed(before, measured.protected)
        if not changed:
            return None
        named = "; ".join(fact.label for fact in changed[:3])
        more = f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        return f"{PROTECTED_REASON}: {named}{more}"

    def judge(self, measured: BatchMeasurement) -> tuple[BatchMeasurement, str | None]:
        """Why a try fails specificity (None: it passes), and the try with its marginal numbers if measured.

        A changed protected fact fails it first. The cumulative budget is checked against the base. The
        per-batch budget is checked against the base first; only when that fails is the try compared
        with the model before the batch.
        """
        gate = self.gate
        protected = self.protected_failure(measured)
        if protected is not None:
            return measured, protected
        failure = gate.specificity_failure(measured.specificity)
        if failure is not None or not measured.facts:
            return measured, failure
        if gate.batch_failure(measured.specificity) is None:
            return measured, None
        return self.own_harm(measured)

    def own_harm(self, measured: BatchMeasurement) -> tuple[BatchMeasurement, str | None]:
        """Why a try fails the per-batch budget against the model before the batch (None: it passes).

        Returns the try with its marginal numbers (remembered as the last try when it is). Without
        log-probabilities to compare, the base stands in for the model before the batch.
        """
        if measured.marginal is None:
            pre = self.measure_pre_batch()
            if pre.logprobs is None or measured.logprobs is None:
                return measured, self.gate.batch_failure(measured.specificity)
            measured = replace(measured, marginal=compare_distributions(pre.logprobs, measured.logprobs))
            if self.last is not None and self.last[0] == measured.facts:
                self.last = (measured.facts, measured)
        assert measured.marginal is not None
        return measured, self.gate.batch_failure(measured.marginal, against="the model before the batch")

    def settle(self, fact: GateFact, status: Status, reason: str, numbers: dict[str, float]) -> None:
        attempts = fact.attempts + (0 if status == "deferred" else 1)
        if status == "retry" and attempts > self.gate.config.efficacy_retries:
            status, reason = "failed", f"{reason}; out of retries after {attempts} tries"
        self.outcomes[fact.key] = FactOutcome(fact.key, status, reason, attempts, numbers)

    def isolate(self, facts: list[GateFact], measured: BatchMeasurement) -> list[GateFact]:
        """The clean facts of `facts`; the harmful ones get their outcome (module doc, step 2)."""
        measured, failure = self.judge(measured)
        if failure is None:
            return facts
        if len(facts) == 1:
            protected = self.protected_failure(measured)
            if protected is not None:
                self.settle(facts[0], "rejected", protected, _numbers(measured, facts[0].key))
                return []
            measured, own = self.own_harm(measured)
            if own is None:
                # its own change is within the per-batch budget: the cumulative budget has no room left,
                # which is not the fact's fault (the drift policy's business, like a blocked batch)
                self.no_room = failure
                reason = f"no room left in the cumulative budget: {failure}"
                self.settle(facts[0], "deferred", reason, _numbers(measured, facts[0].key))
            else:
                self.settle(facts[0], "rejected", f"harms specificity on its own: {own}", _numbers(measured, facts[0].key))
            return []
        left, right = facts[: len(facts) // 2], facts[len(facts) // 2 :]
        m_left, left_failure = self.judge(self.attempt(left))
        m_right, right_failure = self.judge(self.attempt(right))
        if left_failure or right_failure:
            return self.isolate(left, m_left) + self.isolate(right, m_right)
        # each half passes alone but not together: keep the gentler half, send the other back
        keep, drop = (left, right) if self.gate.harm(m_left) <= self.gate.harm(m_right) else (right, left)
        others = ", ".join(str(f.key) for f in keep)
        for fact in drop:
            reason = f"passes with part of the batch but not together with facts {others}: {failure}"
            self.settle(fact, "retry", reason, _numbers(measured, fact.key))
        return keep

    def drop_weak(self, facts: list[GateFact], measured: BatchMeasurement) -> list[GateFact]:
        """The facts that reach the efficacy threshold; the others are sent back to retry (or failed)."""
        kept = []
        for fact in facts:
            efficacy = measured.efficacy.get(fact.key, 0.0)
            if efficacy >= self.gate.config.min_efficacy:
                kept.append(fact)
                continue
            reason = f"efficacy {efficacy:.3f} < min_efficacy {self.gate.config.min_efficacy}"
            self.settle(fact, "retry", reason, _numbers(measured, fact.key))
        return kept


class Gate:
    """Decides which facts of an edit batch commit (see the module doc for the algorithm)."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config

    def specificity_failure(self, result: SpecificityResult) -> str | None:
        """Why `result` (against the frozen base) fails the cumulative budget, or None when it passes."""
        return _failure(result, "min_agreement", self.config.min_agreement, "max_kl", self.config.max_kl, "the base")

    def batch_failure(self, result: SpecificityResult, against: str = "the base") -> str | None:
        """Why `result` fails the per-batch budget, or None when it passes."""
        config = self.config
        return _failure(result, "min_batch_agreement", config.min_batch_agreement, "max_batch_kl", config.max_batch_kl, against)

    def harm(self, measured: BatchMeasurement) -> float:
        """How close a try is to its budgets (1.0 at a threshold), for comparing passing sets."""
        config = self.config
        cumulative = _closeness(measured.specificity, config.min_agreement, config.max_kl)
        batch = measured.marginal or measured.specificity
        return max(cumulative, _closeness(batch, config.min_batch_agreement, config.max_batch_kl))

    def decide(
        self,
        facts: Sequence[GateFact],
        try_batch: TryBatch,
        *,
        pre_batch: BatchMeasurement | MeasurePreBatch | None = None,
        protected: tuple[ProtectedCheck, Answers] | None = None,
    ) -> GateVerdict:
        """Run the gate on one batch.

        `pre_batch` is the measurement of the state before the batch, if known, or a function that
        measures it and leaves the weights of the last try in place (without one, the gate measures it
        with an empty try when it needs it, and re-tries the committed facts last if that was the
        last try). `protected` is the protected-facts check with the model's answers before the batch.
        Measurements in the verdict carry no log-probabilities.
        """
        if len({f.key for f in facts}) != len(facts):
            raise ValueError("facts in one batch must have distinct keys")
        started = time.perf_counter()
        run = _Decision(self, try_batch, pre_batch if callable(pre_batch) else None, protected)
        if isinstance(pre_batch, BatchMeasurement):
            run.pre = pre_batch
        candidates, final, blocked = list(facts), None, None
        try:
            if candidates:
                final = run.attempt(candidates)
            if not self.config.enabled:
                return self._verdict(facts, run, final, started, note="gate disabled")
            candidates, final, blocked = self._settle_batch(run, candidates, final)
            if blocked is None and final is None and run.no_room is not None:
                blocked = f"the cumulative budget has no room for any fact of this batch: {run.no_room}"
            if final is not None and run.applied != final.facts:
                # the pre-batch state was measured after the committed facts' last try: apply them again
                final = replace(run.attempt(candidates), marginal=final.marginal)
        except _BudgetExhausted:
            for fact in facts:
                if fact.key not in run.outcomes:
                    run.settle(
                        fact, "retry", f"isolation stopped after {run.edits} edits (max_isolation_edits)", {}
                    )
            final = None
        return self._verdict(facts, run, final, started, blocked=blocked)

    def _settle_batch(
        self, run: _Decision, candidates: list[GateFact], current: BatchMeasurement | None
    ) -> tuple[list[GateFact], BatchMeasurement | None, str | None]:
        """Steps 2 and 3 of the module doc until the candidates pass or none is left."""
        while candidates and current is not None:
            current, failure = run.judge(current)
            if failure is None:
                kept = run.drop_weak(candidates, current)
                if len(kept) == len(candidates):
                    return candidates, current, None
                candidates = kept
            else:
                pre_batch = run.measure_pre_batch()
                pre_failure = self.specificity_failure(pre_batch.specificity)
                if pre_failure is not None:
                    return self._block(run, candidates, pre_batch, pre_failure)
                if not self.config.isolate_harmful:
                    for fact in candidates:
                        run.settle(
                            fact,
                            "retry",
                            f"batch fails specificity (isolation is off): {failure}",
                            _numbers(current, fact.key),
                        )
                    return [], None, None
                candidates = run.isolate(candidates, current)
            current = run.attempt(candidates) if candidates else None
        return candidates, current, None

    def _block(
        self, run: _Decision, candidates: list[GateFact], pre_batch: BatchMeasurement, failure: str
    ) -> tuple[list[GateFact], None, str]:
        reason = f"the model before this batch already fails specificity: {failure}"
        for fact in candidates:
            run.settle(fact, "deferred", reason, _numbers(pre_batch))
        return [], None, reason

    def _verdict(
        self,
        facts: Sequence[GateFact],
        run: _Decision,
        final: BatchMeasurement | None,
        started: float,
        *,
        blocked: str | None = None,
        note: str = "passed",
    ) -> GateVerdict:
        for fact in facts:
            if fact.key not in run.outcomes and final is not None:
                run.outcomes[fact.key] = FactOutcome(
                    fact.key, "committed", note, fact.attempts + 1, _numbers(final, fact.key)
                )
        outcomes = tuple(run.outcomes[f.key] for f in facts)
        committed = any(o.status == "committed" for o in outcomes)
        return GateVerdict(
            outcomes,
            final.without_logprobs() if committed and final is not None else None,
            run.pre.without_logprobs() if run.pre is not None else None,
            run.edits,
            time.perf_counter() - started,
            run.measure_seconds,
            blocked,
            len(run.protected[0]) if run.protected is not None else 0,
        )
