"""Specificity against the frozen base model: scoring, the base-weight swap, the reference store."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from editing.errors import ModelMismatch
from editing.gate.specificity import (
    FrozenBase,
    ReferenceStore,
    SpecificityCheck,
    compare_distributions,
    probe_set_hash,
    standing_prompts,
)
from editing.model.scoring import answer_scores, next_token_logprobs

PROMPTS = [
    "The capital of France is",
    "Who sang nice day?",
    "Lionel Messi plays the sport of",
    "nq question: who wrote the book",
    "The official language of Peru is",
]
EDITED = "model.layers.1.mlp.down_proj.weight"


def _perturb(model: torch.nn.Module, name: str = EDITED, scale: float = 2.0, seed: int = 7) -> None:
    param = dict(model.named_parameters())[name]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        param.add_(scale * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_left_padded_batches_score_like_single_rows(gate_tiny_lm: Any, bpe_tokenizer: Any, model_type: str) -> None:
    """Left padding, position ids and logits_to_keep give the numbers of unpadded single-row passes."""
    model = gate_tiny_lm(model_type)
    batched = next_token_logprobs(model, bpe_tokenizer, PROMPTS, batch_size=8)
    singles = torch.cat([next_token_logprobs(model, bpe_tokenizer, [p], batch_size=1) for p in PROMPTS])
    assert batched.shape == (len(PROMPTS), len(bpe_tokenizer))
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)

    answers = ["Paris", "the Beatles", "football", "Walter Sobchak", "Spanish"]
    together = answer_scores(model, bpe_tokenizer, PROMPTS, answers, batch_size=8)
    for i, (prompt, answer) in enumerate(zip(PROMPTS, answers, strict=True)):
        alone = answer_scores(model, bpe_tokenizer, [prompt], [answer], batch_size=1)
        assert together.log_likelihood[i].item() == pytest.approx(alone.log_likelihood[0].item(), abs=1e-4)
        assert together.token_accuracy[i].item() == alone.token_accuracy[0].item()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_cached_prefix_scores_like_the_whole_sequence(gate_tiny_lm: Any, bpe_tokenizer: Any, model_type: str) -> None:
    """Few-shot prefixes run once: rows continuing the cached prefix get the logits of the full sequence."""
    model = gate_tiny_lm(model_type)
    prefix = "The capital of Italy is Rome.\n\n"
    cached = next_token_logprobs(model, bpe_tokenizer, PROMPTS, batch_size=3, prefix=prefix)
    prefix_ids = bpe_tokenizer(prefix)["input_ids"]
    for i, prompt in enumerate(PROMPTS):
        ids = prefix_ids + bpe_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(cached[i], torch.log_softmax(logits.float(), -1), atol=1e-5, rtol=1e-5)


def test_answer_scores_are_teacher_forced_sums(gate_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    """The log-likelihood is the sum of per-token log-probabilities of " answer" after the prompt."""
    model = gate_tiny_lm("llama")
    prompt, answer = "The capital of Italy is", "Rome city"
    prompt_ids = bpe_tokenizer(prompt)["input_ids"]
    answer_ids = bpe_tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + answer_ids[:-1]])).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)[len(prompt_ids) - 1 :]
    expected = sum(logprobs[k, t].item() for k, t in enumerate(answer_ids))
    hits = sum(int(logprobs[k].argmax().item() == t) for k, t in enumerate(answer_ids))
    scores = answer_scores(model, bpe_tokenizer, [prompt], [answer], batch_size=4)
    assert scores.log_likelihood[0].item() == pytest.approx(expected, abs=1e-4)
    assert scores.token_accuracy[0].item() == pytest.approx(hits / len(answer_ids))


def test_compare_distributions_agreement_and_kl() -> None:
    base = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]))
    same = compare_distributions(base, base.clone())
    assert (same.n_prompts, same.agreement, same.mean_kl, same.max_kl) == (2, 1.0, 0.0, 0.0)

    edited = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]))
    result = compare_distributions(base, edited)
    kl0 = 0.7 * math.log(0.7 / 0.1) + 0.2 * math.log(1.0) + 0.1 * math.log(0.1 / 0.7)
    kl1 = 0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.3)  # the base's zero-probability token adds nothing
    assert result.agreement == 0.5
    assert result.mean_kl == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    assert result.max_kl == pytest.approx(kl0, rel=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        compare_distributions(base, edited[:1])


def test_frozen_base_swaps_in_base_weights_and_restores_live_ones_exactly(gate_tiny_lm: Any) -> None:
    model = gate_tiny_lm("llama")
    base = FrozenBase.capture(model, "fp", [EDITED])
    original = dict(model.named_parameters())[EDITED].detach().clone()
    _perturb(model)
    live = dict(model.named_parameters())[EDITED].detach().clone()
    with base.active(model):
        assert torch.equal(dict(model.named_parameters())[EDITED], original)
    assert torch.equal(dict(model.named_parameters())[EDITED], live)

    with pytest.raises(RuntimeError, match="boom"), base.active(model):
        raise RuntimeError("boom")
    assert torch.equal(dict(model.named_parameters())[EDITED], live)
    with pytest.raises(ModelMismatch, match="name parameters"):
        FrozenBase.capture(model, "fp", ["model.layers.1.mlp.down_proj"])


def test_reference_store_computes_each_set_once_and_persists(gate_tiny_lm: Any, tmp_path: Path) -> None:
    model = gate_tiny_lm("llama")
    calls: list[int] = []

    def compute(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"x": torch.arange(3.0)}

    store = ReferenceStore(FrozenBase("a" * 64, {}), tmp_path, max_sets=1)
    for _ in range(3):
        assert torch.equal(store.get(model, "standing", "h1", compute, persist=True)["x"], torch.arange(3.0))
    assert store.computed == 1 and len(calls) == 1
    assert store.path("standing", "h1") is not None and store.path("standing", "h1").is_file()  # type: ignore[union-attr]

    again = ReferenceStore(FrozenBase("a" * 64, {}), tmp_path)
    again.get(model, "standing", "h1", compute, persist=True)
    assert (again.computed, again.loaded) == (0, 1)

    other_base = ReferenceStore(FrozenBase("b" * 64, {}), tmp_path)  # another base model: never reused
    other_base.get(model, "standing", "h1", compute, persist=True)
    assert other_base.computed == 1

    # unpersisted sets are recomputed once evicted (max_sets=1)
    store.get(model, "extra", "e1", compute)
    store.get(model, "extra", "e2", compute)
    store.get(model, "extra", "e1", compute)
    assert store.computed == 4
    assert probe_set_hash("a", [1]) != probe_set_hash("a", [2])


def test_specificity_is_measured_against_the_frozen_base_not_the_live_model(
    gate_tiny_lm: Any, bpe_tokenizer: Any
) -> None:
    """Promise 5: references come from base weights even when first computed after an edit."""
    model = gate_tiny_lm("llama")
    base = FrozenBase.capture(model, "fp", [EDITED])
    check = SpecificityCheck(ReferenceStore(base), PROMPTS[:3], batch_size=4)
    _perturb(model, scale=3.0)  # the model is edited before any reference exists
    drifted = check.measure(model, bpe_tokenizer, extra_prompts=PROMPTS[3:])
    assert drifted.n_prompts == 5
    assert drifted.mean_kl > 1e-3

    with base.active(model):  # the base model itself agrees with its own references
        clean = check.measure(model, bpe_tokenizer, extra_prompts=PROMPTS[3:])
    assert clean.agreement == 1.0
    assert clean.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert check.references.computed == 2  # standing and extra sets, each once


def test_standing_prompts_ship_with_the_package() -> None:
    prompts = standing_prompts()
    assert len(prompts) >= 100
    assert len(set(prompts)) == len(prompts)
    assert all(p.strip() for p in prompts)


@pytest.mark.real_model
def test_real_model_base_agrees_with_itself_and_knows_tokyo(default_model: Any) -> None:
    model, tokenizer = default_model.model, default_model.tokenizer
    standing = standing_prompts()[:8]
    check = SpecificityCheck(ReferenceStore(FrozenBase(default_model.fingerprint, {})), standing)
    result = check.measure(model, tokenizer, [standing[0], "The capital city of Japan is"])
    assert (result.n_prompts, result.agreement) == (9, 1.0)  # a standing prompt given again counts once
    assert result.mean_kl == pytest.approx(0.0, abs=1e-5)
    logprobs = next_token_logprobs(model, tokenizer, ["The capital city of Japan is"], batch_size=1)
    assert tokenizer.decode([int(logprobs[0].argmax())]).strip() == "Tokyo"
