"""Teacher-forced metrics on hand-made logits, and `evaluate_examples` on a tiny model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from editing.data import EditExample
from editing.model.edit_metrics import (
    agreement,
    counterfact_sequence_success,
    counterfact_token_scores,
    evaluate_examples,
    next_token_kl,
    sequence_nll,
    token_accuracy,
)
from editing.model.loading import LoadedModel
from editing.model.tokenise import tokenise

X = -100
V = 10


def _logits(favourites: list[list[int | None]], low: float = 0.0, high: float = 5.0) -> torch.Tensor:
    """(B, T, V) logits where position (b, t) has `high` on token favourites[b][t] and `low` elsewhere."""
    logits = torch.full((len(favourites), len(favourites[0]), V), low)
    for b, row in enumerate(favourites):
        for t, token in enumerate(row):
            if token is not None:
                logits[b, t, token] = high
    return logits


def test_token_accuracy_counts_answer_positions_only() -> None:
    logits = _logits([[9, 2, 1, 9], [9, 9, 4, 9]])
    labels = torch.tensor([[X, 2, 3, X], [X, X, 4, X]])
    assert token_accuracy(logits, labels).tolist() == [0.5, 1.0]


def test_rows_without_answer_positions_are_refused() -> None:
    with pytest.raises(ValueError, match=r"rows \[1\] have no answer position"):
        token_accuracy(_logits([[1, 1], [1, 1]]), torch.tensor([[1, X], [X, X]]))
    with pytest.raises(ValueError, match="do not match labels"):
        token_accuracy(_logits([[1, 1]]), torch.tensor([[1, X, X]]))


def test_counterfact_equal_lengths() -> None:
    # position 1: the new token 5 wins; position 2: tie between 6 and 8, which is no win for either
    logits = _logits([[0, 5, None, 0]])
    logits[0, 2, 6] = logits[0, 2, 8] = 3.0
    labels = torch.tensor([[X, 5, 6, X]])
    old = torch.tensor([[X, 7, 8, X]])
    assert counterfact_token_scores(logits, labels, old, new_wins=True).tolist() == [0.5]
    assert counterfact_token_scores(logits, labels, old, new_wins=False).tolist() == [0.0]
    logits[0, 2, 8] = 4.0
    assert counterfact_token_scores(logits, labels, old, new_wins=False).tolist() == [0.5]


def test_counterfact_longer_answer_is_capped_by_the_competitor_length() -> None:
    # the new answer has 3 tokens and wins everywhere; the old has 1, so 2 positions fail: 1/3
    logits = _logits([[None, 3, 4, 5]])
    labels = torch.tensor([[X, 3, 4, 5]])
    old = torch.tensor([[X, 7, X, X]])
    assert counterfact_token_scores(logits, labels, old).tolist() == pytest.approx([1 / 3])


def test_counterfact_narrower_competitor_truncates_the_denominator() -> None:
    # as in the reference: labels are cut to the competitor tensor's width, positions and denominator alike
    logits = _logits([[None, 3, 4, 5], [None, 3, 4, 5]])
    labels = torch.tensor([[X, 3, 4, 5], [X, 3, 4, 5]])
    old = torch.tensor([[X, 7, 8], [X, 3, 8]])  # width 3 < 4
    # row 0 wins at 1 and 2 (position 3 cut away): 2/2; row 1 ties at 1 (same token), wins at 2: 1/2
    assert counterfact_token_scores(logits, labels, old).tolist() == [1.0, 0.5]


def test_counterfact_wider_competitor_is_cut_to_the_labels() -> None:
    logits = _logits([[None, 3, 4]])
    labels = torch.tensor([[X, 3, 4]])
    old = torch.tensor([[X, 7, 8, 9, 9]])
    assert counterfact_token_scores(logits, labels, old).tolist() == [1.0]


def test_sequence_nll_matches_the_definition() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, V)
    labels = torch.tensor([[X, 3, 4, X], [X, X, 7, X]])
    log_p = logits.log_softmax(-1)
    expected = [-(log_p[0, 1, 3] + log_p[0, 2, 4]).item() / 2, -log_p[1, 2, 7].item()]
    assert sequence_nll(logits, labels).tolist() == pytest.approx(expected, rel=1e-5)


def test_counterfact_sequence_success_compares_mean_nll() -> None:
    # the answer is likely at its one position; the two-token competitor is unlikely at both
    logits = _logits([[None, 3, None]], high=6.0)
    labels = torch.tensor([[X, 3, X]])
    competitor = _logits([[None, 1, 1]], high=-2.0)
    competitor_labels = torch.tensor([[X, 8, 9]])
    assert counterfact_sequence_success(logits, labels, competitor, competitor_labels).tolist() == [1.0]
    assert counterfact_sequence_success(logits, labels, competitor, competitor_labels, new_wins=False).tolist() == [0.0]


def test_agreement_with_logits_or_predictions() -> None:
    edited = _logits([[0, 1, 2, 3]])
    reference = _logits([[0, 1, 5, 3]])
    labels = torch.tensor([[X, 9, 9, 9]])  # the label values do not matter, only where they are
    assert agreement(edited, reference, labels).tolist() == pytest.approx([2 / 3])
    assert agreement(edited, reference.argmax(-1), labels).tolist() == pytest.approx([2 / 3])
    with pytest.raises(ValueError, match="does not match labels"):
        agreement(edited, torch.zeros(1, 3, dtype=torch.long), labels)


def test_next_token_kl() -> None:
    torch.manual_seed(1)
    reference = torch.randn(2, 3, V)
    edited = reference.clone()
    edited[0, 1] += torch.randn(V)
    positions = torch.tensor([[False, True, True], [True, False, False]])
    kl = next_token_kl(edited, reference, positions)
    p, q = reference[0, 1].softmax(-1), edited[0, 1].softmax(-1)
    expected = (p * (p.log() - q.log())).sum().item() / 2  # position 2 is unchanged: KL 0
    assert kl.tolist() == pytest.approx([expected, 0.0], abs=1e-6)
    assert kl[0] > 0
    with pytest.raises(ValueError, match="at least one position"):
        next_token_kl(edited, reference, torch.zeros(2, 3, dtype=torch.bool))


# --- evaluate_examples on a tiny model ---------------------------------------------------------

EXAMPLES = [
    EditExample(
        "The capital of France is",
        "Rome",
        "Paris",
        "France",
        ("France's capital is", "The capital city of France is"),
        (("The official language of Peru is", "Spanish"), ("Walter Sobchak was born in", "Berlin")),
    ),
    EditExample(
        "Anna Berg is employed by",
        "Google",
        "Nokia Networks",
        "Anna Berg",
        ("Anna Berg works for",),
        (("Who sang", "nice day"),),
    ),
]


@pytest.fixture
def tiny_llama(gate_tiny_lm: Callable[..., Any]) -> Any:
    return gate_tiny_lm("llama", seed=3)


def test_evaluate_examples_matches_the_batch_metrics(tiny_llama: Any, bpe_tokenizer: Any) -> None:
    result = evaluate_examples(tiny_llama, bpe_tokenizer, EXAMPLES, batch_size=2)
    batch = tokenise(bpe_tokenizer, [e.prompt for e in EXAMPLES], [e.target_new for e in EXAMPLES])
    with torch.no_grad():
        logits = tiny_llama(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert result.efficacy == pytest.approx(token_accuracy(logits, batch.labels).tolist())
    assert [len(g) for g in result.generalisation] == [2, 1]
    assert [len(s) for s in result.specificity] == [2, 1]
    assert result.retention is None
    assert len(result.reference.predictions) == 3
    # padding does not change anything: one row at a time gives the same numbers
    single = evaluate_examples(tiny_llama, bpe_tokenizer, EXAMPLES, batch_size=1)
    assert single.efficacy == pytest.approx(result.efficacy)
    assert single.specificity == result.specificity


def test_retention_is_agreement_with_the_unedited_model(tiny_llama: Any, bpe_tokenizer: Any) -> None:
    before = evaluate_examples(tiny_llama, bpe_tokenizer, EXAMPLES)
    same = evaluate_examples(tiny_llama, bpe_tokenizer, EXAMPLES, reference=before.reference)
    assert same.retention == [[1.0, 1.0], [1.0]]
    assert same.summary()["retention"] == 1.0
    with torch.no_grad():
        tiny_llama.lm_head.weight.add_(torch.randn_like(tiny_llama.lm_head.weight) * 5)
    changed = evaluate_examples(tiny_llama, bpe_tokenizer, EXAMPLES, reference=before.reference)
    assert changed.retention is not None and changed.summary()["retention"] < 1.0
    with pytest.raises(ValueError, match="computed for other examples"):
        evaluate_examples(tiny_llama, bpe_tokenizer, EXAMPLES[:1], reference=before.reference)


@pytest.mark.parametrize("metric", ["counterfact", "counterfact_sequence"])
def test_counterfact_metrics_on_a_tiny_model(tiny_llama: Any, bpe_tokenizer: Any, metric: Any) -> None:
    result = evaluate_examples(tiny_llama, bpe_tokenizer, EXAMPLES, metric=metric)
    values = result.efficacy + [v for g in result.generalisation + result.specificity for v in g]
    assert all(0.0 <= v <= 1.0 for v in values)
    summary = result.summary()
    assert set(summary) == {"efficacy", "generalisation", "specificity"}
    with pytest.raises(ValueError, match="needs target_true"):
        evaluate_examples(tiny_llama, bpe_tokenizer, [EditExample("p", "a")], metric=metric)


def test_counterfact_edit_towards_the_new_answer_wins_everywhere(tiny_llama: Any, bpe_tokenizer: Any) -> None:
    # make the new target's first token overwhelmingly likely everywhere: ES must be 1 on one-token answers
    # " capital" and " of" are single tokens of the fixture's tokenizer (frequent in its corpus)
    example = EditExample("Walter Sobchak was born in", "capital", "of", None, ("Walter Sobchak is from",))
    (new,) = bpe_tokenizer(" capital", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        tiny_llama.lm_head.bias = torch.nn.Parameter(torch.zeros(len(bpe_tokenizer)))
        tiny_llama.lm_head.bias[new] = 1e4
    result = evaluate_examples(tiny_llama, bpe_tokenizer, [example], metric="counterfact")
    assert result.efficacy == [1.0]
    assert result.generalisation == [[1.0]]


@pytest.mark.real_model
def test_smollm2_knows_paris_and_prefers_it(default_model: LoadedModel) -> None:
    example = EditExample(
        "The capital of France is",
        "Rome",
        "Paris",
        locality=(("The capital of Japan is", "Tokyo"),),
    )
    model, tok = default_model.model, default_model.tokenizer
    zsre = evaluate_examples(model, tok, [example])
    assert zsre.efficacy == [0.0]  # the unedited model does not say Rome
    assert zsre.specificity == [[1.0]]  # and knows Tokyo
    for metric in ("counterfact", "counterfact_sequence"):
        cf = evaluate_examples(model, tok, [example], metric=metric)  # type: ignore[arg-type]
        assert cf.efficacy == [0.0] and cf.specificity == [[1.0]]
