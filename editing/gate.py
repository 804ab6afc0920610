"""The per-batch commit gate: measure an edited batch, decide what commits, isolate harmful facts.

`BatchChecker.measure` scores the live (edited) model: efficacy of each fact (teacher-forced token
accuracy of its target on its prompt, spec §8.1) and specificity against the frozen base model on the
standing prompts plus the batch's locality prompts (`editing.specificity`).

`Gate.decide` drives a caller-supplied `try_batch(facts) -> BatchMeasurement`, which restores the
pre-batch weights, edits exactly `facts` (none: leaves the pre-batch state) and measures. Algorithm:

1. Try the whole batch. If specificity passes, go to 3.
2. Specificity fails. If the pre-batch state already fails, the batch is not to blame: every fact is
   deferred and the verdict is `blocked` (the drift policy's business). Otherwise bisect: a failing set
   of more than one fact is split in halves, each re-edited from the pre-batch state and measured; a
   failing half is bisected further, a passing half is clean, a failing single fact is rejected with its
   numbers. When both halves pass but their union fails (harm that only adds up), the half with the
   larger harm is sent back for a later batch. With k harmful facts among n this costs at most
   2·k·⌈log2 n⌉ re-edits.
3. Facts whose efficacy is below the threshold leave the batch: retried later (up to
   `efficacy_retries` times), then failed. The remaining facts are re-edited and re-checked (back to 2).

Invariant: when the verdict commits any facts, the last `try_batch` call was with exactly those facts in
input order, so an editor that leaves its last try applied holds the state to commit, and
`verdict.final` is its measurement. Every outcome carries its reason and the measured numbers, and
every record is JSON-ready (`to_dict`) for the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from editing.data import EditExample
from editing.gate_config import GateConfig
from editing.scoring import answer_scores
from editing.specificity import ReferenceStore, SpecificityCheck, SpecificityResult, standing_prompts

FactKey = int | str
Status = Literal["committed", "rejected", "retry", "failed", "deferred"]


@dataclass(frozen=True)
class GateFact:
    """A fact in an edit batch: the ledger's key, the example to edit and how often it was tried before."""

    key: FactKey
    example: EditExample
    attempts: int = 0


def locality_prompts(facts: Sequence[GateFact]) -> list[str]:
    """The distinct locality prompts of `facts`, in order: one specificity set for every subset of a batch."""
    return list(dict.fromkeys(prompt for fact in facts for prompt, _ in fact.example.locality))


@dataclass(frozen=True)
class BatchMeasurement:
    """What the gate measured on the model edited with `facts`."""

    facts: tuple[FactKey, ...]
    efficacy: Mapping[FactKey, float]  #: teacher-forced token accuracy of each fact's target
    specificity: SpecificityResult
    seconds: float  #: time spent measuring (not editing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "facts": list(self.facts),
            "efficacy": [{"fact": key, "efficacy": value} for key, value in self.efficacy.items()],
            "specificity": self.specificity.to_dict(),
            "seconds": self.seconds,
        }


TryBatch = Callable[[Sequence[GateFact]], BatchMeasurement]


class BatchChecker:
    """Measures efficacy and specificity of the live model for one edit batch."""

    def __init__(self, config: GateConfig, specificity: SpecificityCheck) -> None:
        self.config = config
        self.specificity = specificity

    @classmethod
    def from_config(cls, config: GateConfig, references: ReferenceStore) -> BatchChecker:
        """A checker on the first `specificity_prompts` standing prompts."""
        standing = standing_prompts()[: config.specificity_prompts]
        return cls(config, SpecificityCheck(references, standing, config.batch_size))

    def measure(
        self, model: nn.Module, tokenizer: Any, facts: Sequence[GateFact], extra_prompts: Sequence[str] = ()
    ) -> BatchMeasurement:
        """Efficacy of `facts` and specificity on the standing prompts plus `extra_prompts`.

        Pass the same `extra_prompts` (e.g. `locality_prompts(batch)`) for every subset of one batch, so
        that all tries are measured on the same prompts.
        """
        started = time.perf_counter()
        efficacy: dict[FactKey, float] = {}
        if facts:
            prompts = [f.example.prompt for f in facts]
            targets = [f.example.target_new for f in facts]
            accuracy = answer_scores(
                model, tokenizer, prompts, targets, self.config.batch_size
            ).token_accuracy
            efficacy = {f.key: float(a) for f, a in zip(facts, accuracy.tolist(), strict=True)}
        extra = extra_prompts if self.config.use_locality_prompts else ()
        spec = self.specificity.measure(model, tokenizer, extra)
        return BatchMeasurement(tuple(f.key for f in facts), efficacy, spec, time.perf_counter() - started)


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
        }


def _numbers(measurement: BatchMeasurement, key: FactKey | None = None) -> dict[str, float]:
    out: dict[str, float] = {k: float(v) for k, v in measurement.specificity.to_dict().items()}
    if key is not None and key in measurement.efficacy:
        out["efficacy"] = measurement.efficacy[key]
    return out


class _BudgetExhausted(Exception):
    """Internal: the batch used up `max_isolation_edits`."""


class _Decision:
    """The state of one `Gate.decide` call: tries made, outcomes so far, the last try."""

    def __init__(self, gate: Gate, try_batch: TryBatch) -> None:
        self.gate = gate
        self.try_batch = try_batch
        self.edits = 0
        self.measure_seconds = 0.0
        self.outcomes: dict[FactKey, FactOutcome] = {}
        self.last: tuple[tuple[FactKey, ...], BatchMeasurement] | None = None

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
        return measurement

    def measure_pre_batch(self) -> BatchMeasurement:
        """Measure the state before the batch (an empty try: no edit, not budgeted)."""
        measurement = self.try_batch([])
        self.measure_seconds += measurement.seconds
        self.last = ((), measurement)
        return measurement

    def settle(self, fact: GateFact, status: Status, reason: str, numbers: dict[str, float]) -> None:
        attempts = fact.attempts + (0 if status == "deferred" else 1)
        if status == "retry" and attempts > self.gate.config.efficacy_retries:
            status, reason = "failed", f"{reason}; out of retries after {attempts} tries"
        self.outcomes[fact.key] = FactOutcome(fact.key, status, reason, attempts, numbers)

    def isolate(self, facts: list[GateFact], measured: BatchMeasurement) -> list[GateFact]:
        """The clean facts of `facts`; the harmful ones get their outcome (module doc, step 2)."""
        failure = self.gate.specificity_failure(measured.specificity)
        if failure is None:
            return facts
        if len(facts) == 1:
            self.settle(
                facts[0],
                "rejected",
                f"harms specificity on its own: {failure}",
                _numbers(measured, facts[0].key),
            )
            return []
        left, right = facts[: len(facts) // 2], facts[len(facts) // 2 :]
        m_left, m_right = self.attempt(left), self.attempt(right)
        if self.gate.specificity_failure(m_left.specificity) or self.gate.specificity_failure(
            m_right.specificity
        ):
            return self.isolate(left, m_left) + self.isolate(right, m_right)
        # each half passes alone but not together: keep the gentler half, send the other back
        keep, drop = (
            (left, right)
            if self.gate.harm(m_left.specificity) <= self.gate.harm(m_right.specificity)
            else (right, left)
        )
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
        """Why `result` fails the specificity thresholds, or None when it passes."""
        problems = []
        if result.agreement < self.config.min_agreement:
            problems.append(f"agreement {result.agreement:.3f} < min_agreement {self.config.min_agreement}")
        if result.mean_kl > self.config.max_kl:
            problems.append(f"mean KL {result.mean_kl:.4f} > max_kl {self.config.max_kl}")
        if problems:
            problems.append(f"on {result.n_prompts} unrelated prompts")
        return "; ".join(problems) or None

    def harm(self, result: SpecificityResult) -> float:
        """How close `result` is to the thresholds (1.0 at a threshold), for comparing passing sets."""
        disagreement = (1.0 - result.agreement) / max(1e-9, 1.0 - self.config.min_agreement)
        return max(disagreement, result.mean_kl / max(1e-12, self.config.max_kl))

    def decide(
        self, facts: Sequence[GateFact], try_batch: TryBatch, *, pre_batch: BatchMeasurement | None = None
    ) -> GateVerdict:
        """Run the gate on one batch; `pre_batch` is the measurement of the state before it, if known."""
        if len({f.key for f in facts}) != len(facts):
            raise ValueError("facts in one batch must have distinct keys")
        started = time.perf_counter()
        run = _Decision(self, try_batch)
        candidates, final, blocked = list(facts), None, None
        try:
            if candidates:
                final = run.attempt(candidates)
            if not self.config.enabled:
                return self._verdict(facts, run, final, None, started, note="gate disabled")
            candidates, final, pre_batch, blocked = self._settle_batch(run, candidates, final, pre_batch)
        except _BudgetExhausted:
            for fact in facts:
                if fact.key not in run.outcomes:
                    run.settle(
                        fact, "retry", f"isolation stopped after {run.edits} edits (max_isolation_edits)", {}
                    )
            final = None
        return self._verdict(facts, run, final, pre_batch, started, blocked=blocked)

    def _settle_batch(
        self,
        run: _Decision,
        candidates: list[GateFact],
        current: BatchMeasurement | None,
        pre_batch: BatchMeasurement | None,
    ) -> tuple[list[GateFact], BatchMeasurement | None, BatchMeasurement | None, str | None]:
        """Steps 2 and 3 of the module doc until the candidates pass or none is left."""
        while candidates and current is not None:
            failure = self.specificity_failure(current.specificity)
            if failure is None:
                kept = run.drop_weak(candidates, current)
                if len(kept) == len(candidates):
                    return candidates, current, pre_batch, None
                candidates = kept
            else:
                if pre_batch is None:
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
                    return [], None, pre_batch, None
                candidates = run.isolate(candidates, current)
            current = run.attempt(candidates) if candidates else None
        return candidates, current, pre_batch, None

    def _block(
        self, run: _Decision, candidates: list[GateFact], pre_batch: BatchMeasurement, failure: str
    ) -> tuple[list[GateFact], None, BatchMeasurement, str]:
        reason = f"the model before this batch already fails specificity: {failure}"
        for fact in candidates:
            run.settle(fact, "deferred", reason, _numbers(pre_batch))
        return [], None, pre_batch, reason

    def _verdict(
        self,
        facts: Sequence[GateFact],
        run: _Decision,
        final: BatchMeasurement | None,
        pre_batch: BatchMeasurement | None,
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
            final if committed else None,
            pre_batch,
            run.edits,
            time.perf_counter() - started,
            run.measure_seconds,
            blocked,
        )
