"""The per-batch gate: efficacy and specificity checks, isolation of harmful facts by bisection, retries.

The isolation tests edit a tiny real model with a deterministic weight perturbation per fact (harmful
facts perturb a lot) and measure it with the real `BatchChecker`; the decision logic is exercised on
synthetic measurements where only the decision is under test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editing.data import EditExample
from editing.gate.checks import BatchChecker, BatchMeasurement, Gate, GateFact, locality_prompts
from editing.gate.config import GateConfig
from editing.gate.specificity import FrozenBase, ReferenceStore, SpecificityCheck, SpecificityResult

EDITED = "model.layers.1.mlp.down_proj.weight"
UNRELATED = [
    "The capital of France is",
    "Who sang nice day?",
    "Lionel Messi plays the sport of",
    "The official language of Peru is",
    "Danielle Okafor is employed by",
    "The mother tongue of Anna Berg is",
]


def _fact(key: int, attempts: int = 0) -> GateFact:
    example = EditExample(f"Fact number {key} is", "Paris", locality=((f"nq question: who wrote book {key}?", "x"),))
    return GateFact(key, example, attempts)


class PerturbationEditor:
    """A stand-in editor: fact k adds scale_k times a fixed random direction to one weight matrix.

    `try_batch` restores the pre-batch weights, applies the subset's perturbations and measures with
    the real checker, like the service's try_batch does with the real editor.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, checker: BatchChecker, scales: dict[int, float]) -> None:
        self.model, self.tokenizer, self.checker, self.scales = model, tokenizer, checker, scales
        self.param = dict(model.named_parameters())[EDITED]
        self.pre_batch = self.param.detach().clone()
        self.calls: list[tuple[int, ...]] = []
        self.extra: list[str] = []

    def direction(self, key: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1000 + key)
        direction = torch.randn(self.param.shape, generator=generator)
        return direction / direction.norm() * self.pre_batch.norm()

    def try_batch(self, facts: Sequence[GateFact]) -> BatchMeasurement:
        self.calls.append(tuple(int(f.key) for f in facts))
        with torch.no_grad():
            self.param.copy_(self.pre_batch)
            for fact in facts:
                self.param.add_(self.scales[int(fact.key)] * self.direction(int(fact.key)))
        return self.checker.measure(self.model, self.tokenizer, facts, self.extra)


def _real_setup(gate_tiny_lm: Any, bpe_tokenizer: Any, scales: dict[int, float], **overrides: Any) -> tuple:
    model = gate_tiny_lm("llama")
    # a random tiny model is nearly uniform, so agreement is the sensitive check here
    config = GateConfig(min_efficacy=0.0, min_agreement=0.95, max_kl=0.001, batch_size=32, **overrides)
    store = ReferenceStore(FrozenBase.capture(model, "tiny", [EDITED]))
    checker = BatchChecker(config, SpecificityCheck(store, UNRELATED, batch_size=32))
    return Gate(config), PerturbationEditor(model, bpe_tokenizer, checker, scales), store


@pytest.mark.parametrize("harmful", [(5,), (0, 7, 8)])
def test_bisection_rejects_exactly_the_harmful_facts(gate_tiny_lm: Any, bpe_tokenizer: Any, harmful: tuple) -> None:
    n = 16
    scales = {k: (30.0 if k in harmful else 0.0005) for k in range(n)}
    gate, editor, store = _real_setup(gate_tiny_lm, bpe_tokenizer, scales)
    facts = [_fact(k) for k in range(n)]
    editor.extra = locality_prompts(facts)
    verdict = gate.decide(facts, editor.try_batch)

    status = {o.key: o.status for o in verdict.outcomes}
    assert sorted(k for k, s in status.items() if s == "rejected") == sorted(harmful)
    assert sorted(verdict.committed) == sorted(set(range(n)) - set(harmful))
    # the last try is exactly the committed set, and it passes
    assert editor.calls[-1] == verdict.committed
    assert verdict.final is not None and verdict.final.facts == verdict.committed
    assert gate.specificity_failure(verdict.final.specificity) is None
    # O(k log n) re-edits: two per failing node of the bisection tree, plus the first and the final edit
    assert verdict.edits <= 2 * len(harmful) * math.ceil(math.log2(n)) + 2
    for outcome in verdict.outcomes:
        if outcome.status == "rejected":
            assert "harms specificity on its own" in outcome.reason
            assert outcome.numbers["mean_kl"] > 0.001 or outcome.numbers["agreement"] < 0.95
    assert store.computed == 2  # standing and locality references, once each for the whole isolation
    json.dumps(verdict.to_dict())  # ledger-ready


def test_a_clean_batch_commits_after_one_edit(gate_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    gate, editor, _ = _real_setup(gate_tiny_lm, bpe_tokenizer, {k: 0.0005 for k in range(8)})
    facts = [_fact(k) for k in range(8)]
    verdict = gate.decide(facts, editor.try_batch)
    assert verdict.committed == tuple(range(8))
    assert verdict.edits == 1 and editor.calls == [tuple(range(8))]
    assert verdict.pre_batch is None and verdict.blocked is None
    assert all(o.reason == "passed" and "efficacy" in o.numbers for o in verdict.outcomes)


def test_the_per_batch_budget_is_judged_against_the_model_before_the_batch(
    gate_tiny_lm: Any, bpe_tokenizer: Any
) -> None:
    """Earlier edits moved the model far from the base (within the cumulative budget): a batch of gentle
    facts commits, a harmful fact among them is still rejected, and both budgets are recorded."""
    n, harmful = 8, 5
    scales = {k: (30.0 if k == harmful else 0.0005) for k in range(n)}
    gate, editor, _ = _real_setup(
        gate_tiny_lm, bpe_tokenizer, scales, min_batch_agreement=0.95, max_batch_kl=0.001
    )
    gate = Gate(gate.config.model_copy(update={"min_agreement": 0.0, "max_kl": 1000.0}))
    with torch.no_grad():  # "earlier commits": a large move of the edited weight before this batch
        editor.param.add_(12.0 * editor.direction(99))
        editor.pre_batch = editor.param.detach().clone()
    facts = [_fact(k) for k in range(n)]
    editor.extra = locality_prompts(facts)
    verdict = gate.decide(facts, editor.try_batch)

    assert verdict.pre_batch is not None
    assert gate.batch_failure(verdict.pre_batch.specificity) is not None, "the base alone would fail every batch"
    assert [o.key for o in verdict.outcomes if o.status == "rejected"] == [harmful]
    assert verdict.committed == tuple(k for k in range(n) if k != harmful)
    final = verdict.final
    assert final is not None and final.marginal is not None and final.logprobs is None
    assert gate.batch_failure(final.marginal) is None and gate.batch_failure(final.specificity) is not None
    assert editor.calls[-1] == verdict.committed, "the weights left in place are the committed facts'"
    rejected = next(o for o in verdict.outcomes if o.status == "rejected")
    assert "against the model before the batch" in rejected.reason
    assert rejected.numbers["batch_mean_kl"] > 0.001 or rejected.numbers["batch_agreement"] < 0.95
    record = verdict.to_dict()
    assert "marginal" in record["final"] and json.dumps(record)


def test_without_earlier_drift_the_base_stands_in_and_nothing_extra_is_measured(
    gate_tiny_lm: Any, bpe_tokenizer: Any
) -> None:
    gate, editor, _ = _real_setup(gate_tiny_lm, bpe_tokenizer, {k: 0.0005 for k in range(4)})
    verdict = gate.decide([_fact(k) for k in range(4)], editor.try_batch)
    assert editor.calls == [(0, 1, 2, 3)] and verdict.pre_batch is None
    assert verdict.final is not None and verdict.final.marginal is None


# --- decision logic on synthetic measurements -----------------------------------------------------


class SyntheticBatch:
    """Specificity KL = pre-batch KL + the sum of each fact's harm; efficacy per fact from a table."""

    def __init__(self, harm: dict[int, float], efficacy: dict[int, float] | None = None, pre_kl: float = 0.0) -> None:
        self.harm, self.efficacy, self.pre_kl = harm, efficacy or {}, pre_kl
        self.calls: list[tuple[int, ...]] = []

    def try_batch(self, facts: Sequence[GateFact]) -> BatchMeasurement:
        keys = tuple(int(f.key) for f in facts)
        self.calls.append(keys)
        kl = self.pre_kl + sum(self.harm.get(k, 0.0) for k in keys)
        spec = SpecificityResult(10, 1.0, kl, kl)
        return BatchMeasurement(keys, {k: self.efficacy.get(k, 1.0) for k in keys}, spec, 0.01)


CONFIG = GateConfig(min_efficacy=0.9, max_kl=0.1, max_batch_kl=0.1, min_batch_agreement=0.9, efficacy_retries=2)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), max_size=4))))
def test_bisection_finds_any_harmful_subset_within_the_edit_bound(case: tuple[int, set[int]]) -> None:
    n, harmful = case
    batch = SyntheticBatch({k: 1.0 for k in harmful})
    verdict = Gate(CONFIG).decide([_fact(k) for k in range(n)], batch.try_batch)
    assert {o.key for o in verdict.outcomes if o.status == "rejected"} == harmful
    assert set(verdict.committed) == set(range(n)) - harmful
    assert verdict.edits <= 2 * len(harmful) * math.ceil(math.log2(n)) + 2
    if verdict.committed:
        assert batch.calls[-1] == verdict.committed


def test_harm_that_only_adds_up_never_commits_a_failing_set() -> None:
    """Every fact is harmless alone; together they exceed max_kl: commit what fits, send the rest back."""
    batch = SyntheticBatch({k: 0.03 for k in range(8)})  # 8 x 0.03 = 0.24 > 0.1; at most 3 fit
    verdict = Gate(CONFIG).decide([_fact(k) for k in range(8)], batch.try_batch)
    assert verdict.final is not None and verdict.final.specificity.mean_kl <= 0.1
    assert 1 <= len(verdict.committed) <= 3
    assert batch.calls[-1] == verdict.committed
    others = [o for o in verdict.outcomes if o.status != "committed"]
    assert others and all(o.status == "retry" and "not together with facts" in o.reason for o in others)
    assert all(o.attempts == 1 for o in others)


def test_a_model_already_drifted_before_the_batch_blocks_instead_of_blaming_facts() -> None:
    batch = SyntheticBatch({}, pre_kl=0.5)
    verdict = Gate(CONFIG).decide([_fact(k) for k in range(4)], batch.try_batch)
    assert verdict.blocked is not None and "before this batch" in verdict.blocked
    assert [o.status for o in verdict.outcomes] == ["deferred"] * 4
    assert all(o.attempts == 0 for o in verdict.outcomes)  # not held against the facts
    assert batch.calls == [(0, 1, 2, 3), ()] and verdict.committed == ()


def test_harmless_facts_are_deferred_not_rejected_when_the_cumulative_budget_has_no_room() -> None:
    """The model before the batch is just within max_kl; every fact alone pushes it over, but only fact 3's
    own change breaks the per-batch budget: it alone is rejected, the rest wait and the batch is blocked."""
    config = CONFIG.model_copy(update={"max_batch_kl": 1.0})
    batch = SyntheticBatch({k: (2.0 if k == 3 else 0.02) for k in range(4)}, pre_kl=0.09)
    verdict = Gate(config).decide([_fact(k) for k in range(4)], batch.try_batch)
    by_key = {o.key: o for o in verdict.outcomes}
    assert by_key[3].status == "rejected" and "harms specificity on its own" in by_key[3].reason
    assert "max_batch_kl 1.0" in by_key[3].reason
    for key in (0, 1, 2):
        assert by_key[key].status == "deferred" and by_key[key].attempts == 0
        assert "no room left in the cumulative budget" in by_key[key].reason
    assert verdict.committed == () and verdict.blocked is not None and "no room" in verdict.blocked


def test_facts_failing_efficacy_are_retried_then_failed_and_the_rest_re_edited() -> None:
    batch = SyntheticBatch({}, efficacy={1: 0.5, 2: 0.25})
    facts = [_fact(0), _fact(1, attempts=0), _fact(2, attempts=2), _fact(3)]
    verdict = Gate(CONFIG).decide(facts, batch.try_batch)
    by_key = {o.key: o for o in verdict.outcomes}
    assert by_key[1].status == "retry" and by_key[1].attempts == 1
    assert "efficacy 0.500 < min_efficacy 0.9" in by_key[1].reason and by_key[1].numbers["efficacy"] == 0.5
    assert by_key[2].status == "failed" and "out of retries after 3 tries" in by_key[2].reason
    assert verdict.committed == (0, 3)
    assert batch.calls == [(0, 1, 2, 3), (0, 3)]  # re-edited without the weak facts
    assert verdict.final is not None and verdict.final.facts == (0, 3)


def test_isolation_budget_and_switches() -> None:
    facts = [_fact(k) for k in range(16)]
    tight = Gate(CONFIG.model_copy(update={"max_isolation_edits": 2}))
    verdict = tight.decide(facts, SyntheticBatch({3: 1.0, 12: 1.0}).try_batch)
    assert verdict.committed == () and verdict.final is None
    assert {o.status for o in verdict.outcomes} <= {"retry", "rejected"}
    assert any("max_isolation_edits" in o.reason for o in verdict.outcomes)

    off = Gate(CONFIG.model_copy(update={"isolate_harmful": False}))
    verdict = off.decide(facts, SyntheticBatch({3: 1.0}).try_batch)
    assert verdict.committed == () and all("isolation is off" in o.reason for o in verdict.outcomes)

    disabled = Gate(CONFIG.model_copy(update={"enabled": False}))
    verdict = disabled.decide(facts, SyntheticBatch({3: 1.0}, efficacy={4: 0.0}).try_batch)
    assert verdict.committed == tuple(range(16)) and verdict.edits == 1

    with pytest.raises(ValueError, match="distinct keys"):
        Gate(CONFIG).decide([_fact(1), _fact(1)], SyntheticBatch({}).try_batch)
    assert Gate(CONFIG).decide([], SyntheticBatch({}).try_batch).outcomes == ()


def test_specificity_failure_names_every_threshold() -> None:
    gate = Gate(GateConfig(min_agreement=0.9, max_kl=0.1, min_batch_agreement=0.97, max_batch_kl=0.01))
    batch = gate.batch_failure(SpecificityResult(32, 0.95, 0.05, 0.2), against="the model before the batch")
    assert batch is not None and "agreement 0.950 < min_batch_agreement 0.97" in batch
    assert "mean KL 0.0500 > max_batch_kl 0.01" in batch and "against the model before the batch" in batch
    assert gate.specificity_failure(SpecificityResult(32, 0.95, 0.05, 0.2)) is None
    reason = gate.specificity_failure(SpecificityResult(32, 0.8, 0.3, 0.9))
    assert reason is not None
    assert "agreement 0.800 < min_agreement 0.9" in reason and "mean KL 0.3000 > max_kl 0.1" in reason
    assert "32 unrelated prompts" in reason


@pytest.mark.real_model
def test_real_model_batch_check_on_zsre_facts(default_model: Any, shared_data: Any) -> None:
    """Unedited SmolLM2: specificity is perfect and efficacy of counterfactual ZsRE targets is low."""
    records = json.loads((shared_data / "zsre" / "zsre_dev.json").read_text())[:4]
    facts = [
        GateFact(i, EditExample(r["src"], r["alt"], locality=((r["loc"] + "?", r["loc_ans"]),)))
        for i, r in enumerate(records)
    ]
    config = GateConfig(specificity_prompts=8)
    checker = BatchChecker.from_config(config, ReferenceStore(FrozenBase(default_model.fingerprint, {})))
    measurement = checker.measure(default_model.model, default_model.tokenizer, facts, locality_prompts(facts))
    assert measurement.specificity.n_prompts == 12
    assert measurement.specificity.agreement == 1.0
    assert measurement.specificity.mean_kl == pytest.approx(0.0, abs=1e-5)
    assert all(0.0 <= e < 0.9 for e in measurement.efficacy.values())
