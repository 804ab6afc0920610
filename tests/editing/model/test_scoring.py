"""The scoring forward passes call transformers through its supported API and agree with a plain forward."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from editing.model.scoring import next_token_logprobs

PREFIX = "The capital of France is Paris. The capital of Italy is Rome."
PROMPTS = ["The capital of Peru is", "Lionel Messi plays the sport of", "The mother tongue of Anna Berg is"]


def _plain_logprobs(model: Any, tokenizer: Any, prefix: str, prompt: str) -> torch.Tensor:
    """Next-token log-probabilities of prefix + prompt run as one unpadded row, without any cache."""
    ids = tokenizer(prefix, add_special_tokens=True)["input_ids"] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
    return torch.log_softmax(logits[0, -1].float(), dim=-1)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_a_shared_prefix_cache_scores_like_the_whole_text(model_type: str, gate_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model = gate_tiny_lm(model_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = next_token_logprobs(model, bpe_tokenizer, PROMPTS, batch_size=2, prefix=PREFIX)
        uncached = next_token_logprobs(model, bpe_tokenizer, PROMPTS, batch_size=2)

    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecations == []
    expected = torch.stack([_plain_logprobs(model, bpe_tokenizer, PREFIX, p) for p in PROMPTS])
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=1e-4)
    assert uncached.shape == cached.shape
