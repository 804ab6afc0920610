"""Protected facts in the gate: a try that changes a protected answer fails, and bisection rejects its fact.

The decision logic runs on synthetic measurements (each fact's "edit" flips given protected answers);
the answers themselves come from a real tiny model in the last test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from editing.data import EditExample
from editing.gate.checks import PROTECTED_REASON, BatchMeasurement, Gate, GateFact
from editing.gate.config import GateConfig
from editing.gate.protected import ProtectedCheck, ProtectedFact
from editing.gate.specificity import SpecificityResult

PASS_ALL = GateConfig(min_efficacy=0.0, min_agreement=0.0, max_kl=1e9, min_batch_agreement=0.0, max_batch_kl=1e9)
CHECK = ProtectedCheck(
    [ProtectedFact("The CEO of Acme is", "Jane Roe", "'The CEO of Acme is' -> 'Jane Roe', p.jsonl line 1"),
     ProtectedFact("Paris is in", "France", "'Paris is in' -> 'France', p.jsonl line 2")],
    batch_size=8,
)
BEFORE = ((1, 2), (3,))


def _fact(key: int) -> GateFact:
    return GateFact(key, EditExample(f"Fact {key} is", "x"))


def synthetic(flips: dict[int, int]) -> Any:
    """try_batch where fact k flips protected fact flips[k] (when present); everything else passes."""

    def try_batch(facts: Sequence[GateFact]) -> BatchMeasurement:
        answers = [list(a) for a in BEFORE]
        for fact in facts:
            if int(fact.key) in flips:
                answers[flips[int(fact.key)]][0] += 100
        return BatchMeasurement(
            tuple(f.key for f in facts), {f.key: 1.0 for f in facts}, SpecificityResult(8, 1.0, 0.0, 0.0), 0.0,
            protected=tuple(tuple(a) for a in answers),
        )

    return try_batch


@pytest.mark.parametrize("culprits", [{5: 0}, {0: 1, 6: 0}])
def test_the_fact_that_changes_a_protected_answer_is_rejected_naming_it(culprits: dict[int, int]) -> None:
    facts = [_fact(k) for k in range(8)]
    verdict = Gate(PASS_ALL).decide(facts, synthetic(culprits), protected=(CHECK, BEFORE))
    status = {o.key: o for o in verdict.outcomes}
    assert sorted(k for k, o in status.items() if o.status == "rejected") == sorted(culprits)
    for key, index in culprits.items():
        assert status[key].reason.startswith(PROTECTED_REASON) and CHECK.facts[index].label in status[key].reason
    assert sorted(verdict.committed) == sorted(set(range(8)) - set(culprits))
    assert verdict.protected_checked == 2 and verdict.to_dict()["protected_checked"] == 2


def test_without_protected_facts_nothing_is_checked() -> None:
    verdict = Gate(PASS_ALL).decide([_fact(1)], synthetic({1: 0}))
    assert verdict.committed == (1,) and verdict.protected_checked == 0


def test_answers_are_the_teacher_forced_greedy_tokens(gate_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    import torch

    model = gate_tiny_lm("llama")
    answers = CHECK.answers(model, bpe_tokenizer)
    from editing.model.tokenise import encode_pair

    expected = [len(encode_pair(bpe_tokenizer, f.prompt, f.answer)[1]) for f in CHECK.facts]
    assert [len(a) for a in answers] == expected and min(expected) >= 1  # one token per answer position
    assert CHECK.answers(model, bpe_tokenizer) == answers  # deterministic
    assert CHECK.changed(answers, answers) == []
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 5)
    changed = CHECK.changed(answers, CHECK.answers(model, bpe_tokenizer))
    assert changed and all(isinstance(f, ProtectedFact) for f in changed)
