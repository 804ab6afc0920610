"""Answering a /v1/query with a loaded model: a greedy completion and the probability of given answers.

`answer_query` does the model work only; the caller holds whatever guarantees a consistent version
of the weights (the service's read lock) and passes that version in. The completion is the greedy
decoding of `daemon.generation`, the loop the OpenAI routes use too. Answers are scored as the
editor scores targets (`editing.model.scoring.answer_scores`): ``" " + answer`` teacher-forced after the
prompt, so the probability of "Paris" after "The capital of France is" is that of " Paris".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from daemon.api_models import AnswerProbability, QueryResult
from daemon.generation import Sampling, check_context, generate, text_prompt
from daemon.service_view import InvalidInput
from editing.errors import DataFormatError
from editing.model.scoring import answer_scores
from editing.model.tokenise import encode_answer

SCORING_BATCH = 8


def complete(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """Greedy continuation of `prompt` (at most `max_new_tokens`, stopping at EOS): (text, tokens generated)."""
    if max_new_tokens == 0:
        return "", 0
    prompt_ids = text_prompt(tokenizer, prompt)
    check_context(model, len(prompt_ids), max_new_tokens, "max_new_tokens")
    generation = generate(model, tokenizer, prompt_ids, Sampling(max_tokens=max_new_tokens))
    return generation.text, generation.completion_tokens


def score_answers(model: nn.Module, tokenizer: Any, prompt: str, answers: Sequence[str]) -> list[AnswerProbability]:
    """p(" " + answer | prompt) for each answer; InvalidInput for an answer that tokenises to nothing."""
    if not answers:
        return []
    try:
        lengths = [len(encode_answer(tokenizer, a, prompt)) for a in answers]
    except DataFormatError as exc:
        raise InvalidInput(f"answers: {exc}") from None
    scores = answer_scores(model, tokenizer, [prompt] * len(answers), list(answers), batch_size=SCORING_BATCH)
    out = []
    for answer, n_tokens, log_p in zip(answers, lengths, scores.log_likelihood.tolist(), strict=True):
        log_p = min(float(log_p), 0.0)
        out.append(AnswerProbability(answer=answer, probability=math.exp(log_p), log_probability=log_p, tokens=n_tokens))
    return out


def answer_query(
    model: nn.Module, tokenizer: Any, *, model_version: int, prompt: str, answers: Sequence[str], max_new_tokens: int
) -> QueryResult:
    """The whole /v1/query answer from one model state; the caller guarantees the weights do not change meanwhile."""
    completion, generated = complete(model, tokenizer, prompt, max_new_tokens)
    return QueryResult(
        model_version=model_version,
        completion=completion,
        generated_tokens=generated,
        answers=score_answers(model, tokenizer, prompt, answers),
    )
