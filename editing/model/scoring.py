"""Forward passes that score a model cheaply: teacher-forced answers and next-token distributions.

The gate scores many short rows and needs only the logits at the last few positions of each row, so
rows are left-padded (every row's answer positions line up at the right edge) and the language-model
head runs on those positions only (`logits_to_keep`); for a 49k-token vocabulary that head is most of
the cost of a full-width pass. Position ids are computed from the attention mask, so left padding gives
the same logits as an unpadded row on models with absolute positions too.

Tokenisation is that of the editor (spec §1.1, `editing.model.tokenise.encode_pair`): the prompt with the
tokenizer's special tokens, " " + answer without, and the last answer token never fed in.
Rows are sorted by length before batching so that padding stays small; results come back in input order.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from editing.model.edit_metrics import token_accuracy
from editing.model.tokenise import IGNORE_INDEX, encode_pair, pad_id

if TYPE_CHECKING:
    from editing.gate.frozen_layers import FrozenLayers


@dataclass(frozen=True)
class ScoringBatch:
    """A left-padded batch whose last `labels.shape[1]` positions are the scored ones."""

    input_ids: torch.Tensor  # (B, T) long, left-padded
    attention_mask: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T) long, 0 at each row's first real token
    labels: torch.Tensor  # (B, K) long: target of the logits at position T-K+k; -100 where none


@dataclass(frozen=True)
class AnswerScores:
    """Teacher-forced scores of answers given prompts, one entry per (prompt, answer) row."""

    log_likelihood: torch.Tensor  # (N,) float32: sum of log p(answer token) over the answer
    token_accuracy: torch.Tensor  # (N,) float32: share of answer tokens that are the argmax


def model_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the device of the input embeddings (works with a device_map too)."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    return torch.device(embeddings.weight.device)


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return [int(i) for i in tokenizer(prompt, add_special_tokens=True)["input_ids"]]


def left_pad(rows: Sequence[list[int]], labels: Sequence[list[int]], pad: int) -> ScoringBatch:
    """Left-pad `rows`; `labels[i]` are the targets of the last len(labels[i]) positions of row i."""
    width = max(len(r) for r in rows)
    keep = max(len(lab) for lab in labels)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), keep), IGNORE_INDEX, dtype=torch.long)
    for b, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[b, width - len(row) :] = torch.tensor(row)
        attention_mask[b, width - len(row) :] = 1
        targets[b, keep - len(lab) :] = torch.tensor(lab)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return ScoringBatch(input_ids, attention_mask, position_ids, targets)


def tail_logits(model: nn.Module, batch: ScoringBatch, prefix: PrefixCache | None = None) -> torch.Tensor:
    """(B, K, V) float32 logits of the last K positions, K = batch.labels.shape[1]. No gradients.

    With `prefix`, every row continues the cached prefix (the rows' own padding sits between the two,
    masked, and their positions start where the prefix ends).
    """
    device = model_device(model)
    keep = int(batch.labels.shape[1])
    attention_mask, position_ids, cache = batch.attention_mask, batch.position_ids, None
    if prefix is not None:
        rows = int(batch.input_ids.shape[0])
        attention_mask = torch.cat([torch.ones(rows, prefix.length, dtype=torch.long), attention_mask], dim=1)
        position_ids = position_ids + prefix.length
        cache = copy.deepcopy(prefix.cache)  # the forward pass appends to the cache it is given
        cache.batch_repeat_interleave(rows)
    with torch.no_grad():
        # `cache`, not `past_key_values`: transformers renamed it in 5.24 and drops the old name in 5.40
        out = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            cache=cache,
            logits_to_keep=keep,
            use_cache=cache is not None,
        )
    logits: torch.Tensor = out.logits[:, -keep:].float()
    return logits


@dataclass(frozen=True)
class PrefixCache:
    """The key/value cache of a text shared by many rows (e.g. few-shot examples), computed once."""

    length: int
    cache: Any

    @classmethod
    def build(cls, model: nn.Module, tokenizer: Any, prefix: str) -> PrefixCache:
        """Run `prefix` (with the tokenizer's special tokens) once and keep its cache."""
        ids = _prompt_ids(tokenizer, prefix)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=model_device(model)), use_cache=True)
        return cls(len(ids), out.cache)


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def _logits(
    model: nn.Module, batch: ScoringBatch, pad: int, prefix: PrefixCache | None, frozen: FrozenLayers | None
) -> torch.Tensor:
    if frozen is not None and prefix is None:
        return frozen.tail_logits(model, batch, pad)
    return tail_logits(model, batch, prefix)


def next_token_logprobs(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int,
    prefix: str = "",
    frozen: FrozenLayers | None = None,
) -> torch.Tensor:
    """(N, V) float32 log-probabilities of the token after each prompt, on the CPU, in input order.

    A non-empty `prefix` is shared by every prompt: it is tokenised (with special tokens) and run once,
    and each prompt (without special tokens) continues it, so the prefix costs one pass, not N.
    With `frozen` (and no prefix) only the layers from the first edited one run (`FrozenLayers`).
    """
    cache = PrefixCache.build(model, tokenizer, prefix) if prefix else None
    rows = [
        [int(i) for i in tokenizer(p, add_special_tokens=False)["input_ids"]] if prefix else _prompt_ids(tokenizer, p)
        for p in prompts
    ]
    out: list[torch.Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for chunk in _chunks(order, batch_size):
        batch = left_pad([rows[i] for i in chunk], [[IGNORE_INDEX]] * len(chunk), pad_id(tokenizer))
        logprobs = torch.log_softmax(_logits(model, batch, pad_id(tokenizer), cache, frozen)[:, -1], dim=-1).cpu()
        for j, i in enumerate(chunk):
            out[i] = logprobs[j]
    if not rows:
        return torch.empty(0, 0)
    return torch.stack([t for t in out if t is not None])


def answer_scores(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int,
    frozen: FrozenLayers | None = None,
) -> AnswerScores:
    """Teacher-forced log-likelihood and token accuracy of `answers[i]` after `prompts[i]` (spec §8.1).

    With `frozen` only the layers from the first edited one run (`FrozenLayers`).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    pairs = [encode_pair(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    rows = [p + a[:-1] for p, a in pairs]
    loglik = torch.zeros(len(rows))
    accuracy = torch.zeros(len(rows))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for chunk in _chunks(order, batch_size):
        batch = left_pad([rows[i] for i in chunk], [pairs[i][1] for i in chunk], pad_id(tokenizer))
        logprobs = torch.log_softmax(_logits(model, batch, pad_id(tokenizer), None, frozen), dim=-1).cpu()
        scored = batch.labels != IGNORE_INDEX  # (B, K)
        safe = batch.labels.clamp(min=0)
        token_lp = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * scored
        loglik[chunk] = token_lp.sum(-1)
        accuracy[chunk] = token_accuracy(logprobs, batch.labels).float()
    return AnswerScores(loglik, accuracy)
