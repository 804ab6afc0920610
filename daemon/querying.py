"""Answering a /v1/query with a loaded model: a greedy completion and the probability of given answers.

`answer_query` does the model work only; the caller holds whatever guarantees a consistent version
of the weights (the service's read lock) and passes that version in. Answers are scored as the
editor scores targets (`editing.model.scoring.answer_scores`): ``" " + answer`` teacher-forced after the
prompt, so the probability of "Paris" after "The capital of France is" is that of " Paris".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from daemon.api_models import AnswerProbability, QueryResult
from daemon.service_view import InvalidInput
from editing.errors import DataFormatError
from editing.model.scoring import answer_scores, model_device
from editing.model.tokenise import encode_answer, pad_id

SCORING_BATCH = 8


def complete(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """Greedy continuation of `prompt` (at most `max_new_tokens`, stopping at EOS): (text, tokens generated)."""
    if max_new_tokens == 0:
        return "", 0
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)
    input_ids = encoded["input_ids"].to(model_device(model))
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and input_ids.shape[1] + max_new_tokens > context:
        raise InvalidInput(
            f"prompt: {input_ids.shape[1]} tokens plus max_new_tokens {max_new_tokens} exceed the model's "
            f"context of {context} tokens; shorten the prompt"
        )
    with torch.no_grad():
        output = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id(tokenizer),
        )
    new_tokens = output[0, input_ids.shape[1] :]
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True)), int(new_tokens.shape[0])


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
