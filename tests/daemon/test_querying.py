"""`daemon.querying`: completions and answer probabilities, on the real default model and a tiny one."""

from __future__ import annotations

import math
from typing import Any

import pytest

from daemon.querying import answer_query
from daemon.service_view import InvalidInput


@pytest.mark.real_model
def test_the_default_model_knows_a_capital(default_model: Any) -> None:
    result = answer_query(
        default_model.model, default_model.tokenizer, model_version=7,
        prompt="The capital of France is", answers=["Paris", "Berlin", "a city in Europe"], max_new_tokens=3,
    )
    assert result.model_version == 7
    assert result.generated_tokens == 3
    assert result.completion.strip().startswith("Paris")
    paris, berlin, phrase = result.answers
    assert paris.probability > 0.3 > 0.01 > berlin.probability
    assert phrase.tokens > 1 and phrase.probability < paris.probability
    for answer in result.answers:
        assert answer.probability == pytest.approx(math.exp(answer.log_probability))


def test_prompts_beyond_the_context_are_refused(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    context = model.config.max_position_embeddings
    prompt = "x " * context
    with pytest.raises(InvalidInput, match="context"):
        answer_query(model, tokenizer, model_version=0, prompt=prompt, answers=[], max_new_tokens=1)


def test_an_answer_with_no_tokens_is_invalid_input(tiny_lm: tuple[Any, Any]) -> None:
    model, tokenizer = tiny_lm
    with pytest.raises(InvalidInput, match="answers"):
        answer_query(model, tokenizer, model_version=0, prompt="The capital", answers=["\x1c"], max_new_tokens=0)
