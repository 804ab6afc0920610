"""Teacher-forced edit metrics, computed from logits and pre-shifted labels (no generation).

Shapes: `logits` (B, T, V); `labels`/`old_labels` (B, T) long with -100 where there is no target
(`editing.model.tokenise`). Every function returns one value per row, (B,) float, and raises ValueError for a
row with no answer position instead of returning NaN.

- `token_accuracy`: the paper's ZsRE ES/GS/LS (spec §8.1).
- `counterfact_token_scores`: the paper's CounterFact comparison, token by token (spec §8.2).
- `sequence_nll`, `counterfact_sequence_success`: the ROME/MEMIT whole-sequence comparison.
- `agreement`, `next_token_kl`: retention, measured against the unedited model instead of a gold answer.
- `evaluate_examples`: all of the above over `EditExample`s, with the model run in batches.

docs/data.md explains how these differ from the reference code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from editing.data import EditExample, examples_hash
from editing.model.tokenise import IGNORE_INDEX, tokenise, tokenise_with_old

Metric = Literal["accuracy", "counterfact", "counterfact_sequence"]


def _answer_mask(labels: torch.Tensor) -> torch.Tensor:
    mask = labels != IGNORE_INDEX
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no answer position (labels are all -100)")
    return mask


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}: need (B, T, V), (B, T)"
        )


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the fraction of answer positions where argmax(logits) == label (paper ZsRE, §8.1)."""
    _check_shapes(logits, labels)
    mask = _answer_mask(labels)
    correct = (logits.argmax(dim=-1) == labels) & mask
    return correct.sum(dim=-1) / mask.sum(dim=-1)


def _logit_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T): logits[b, t, ids[b, t]], with -100 ids read at token 0 (callers mask them)."""
    return logits.gather(-1, ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def counterfact_token_scores(
    logits: torch.Tensor, labels: torch.Tensor, old_labels: torch.Tensor, *, new_wins: bool = True
) -> torch.Tensor:
    """The paper's CounterFact score per row (spec §8.2, reference `util.py:succ_ratios`), exactly.

    `labels` are the tokens the row is teacher-forced on; `old_labels` the competing answer's tokens,
    aligned to start at the same position. With `new_wins` a position succeeds when the label's logit
    beats the competitor's; without it, when the competitor's beats the label's. The reference always
    uses the first rule: ES/GS rows are teacher-forced on target_new against target_true, LS rows on
    target_true against target_new.

    Kept exactly as the reference computes it: both label tensors are cut to the narrower width (the
    cut positions leave the denominator too); a position where the competitor has no token (-100)
    fails but stays in the denominator, so a longer answer than its competitor cannot score 1; from
    the second answer token on, the competitor is scored on the other answer's prefix. Score =
    successes / answer positions of `labels` (after the cut).
    """
    width = min(labels.shape[1], old_labels.shape[1])
    labels, old_labels, logits = labels[:, :width], old_labels[:, :width], logits[:, :width]
    _check_shapes(logits, labels)
    mask = _answer_mask(labels)
    valid = mask & (old_labels != IGNORE_INDEX)
    label_logit, old_logit = _logit_at(logits, labels), _logit_at(logits, old_labels)
    wins = label_logit > old_logit if new_wins else old_logit > label_logit
    return (wins & valid).sum(dim=-1) / mask.sum(dim=-1)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the mean negative log-likelihood (nats per token) of the answer tokens."""
    _check_shapes(logits, labels)
    mask = _answer_mask(labels)
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, T)
    return (nll * mask).sum(dim=-1) / mask.sum(dim=-1)


def counterfact_sequence_success(
    logits: torch.Tensor,
    labels: torch.Tensor,
    competitor_logits: torch.Tensor,
    competitor_labels: torch.Tensor,
    *,
    new_wins: bool = True,
) -> torch.Tensor:
    """ROME/MEMIT-style success per row (1.0 or 0.0): whole answers compared, each teacher-forced alone.

    `logits`/`labels` come from the rows teacher-forced on the answer in question, `competitor_*` from
    the same prompts teacher-forced on the competing answer. With `new_wins` a row succeeds when the
    answer in question has the lower mean NLL, without it when the competitor has. As for
    `counterfact_token_scores`: ES/GS rows are about target_new (competitor target_true), LS rows about
    the neighbourhood's true answer (competitor target_new), and `new_wins` holds in all three.
    """
    nll, competitor_nll = sequence_nll(logits, labels), sequence_nll(competitor_logits, competitor_labels)
    wins = nll < competitor_nll if new_wins else competitor_nll < nll
    return wins.float()


def agreement(logits_edited: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the fraction of answer positions where the edited model's top-1 token equals the reference's.

    `reference` is the unedited model's logits (B, T, V) or its top-1 predictions (B, T) long.
    """
    _check_shapes(logits_edited, labels)
    mask = _answer_mask(labels)
    predicted = reference.argmax(dim=-1) if reference.dim() == 3 else reference
    if predicted.shape != labels.shape:
        raise ValueError(f"reference {tuple(reference.shape)} does not match labels {tuple(labels.shape)}")
    same = (logits_edited.argmax(dim=-1) == predicted) & mask
    return same.sum(dim=-1) / mask.sum(dim=-1)


def next_token_kl(logits_edited: torch.Tensor, logits_reference: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per row: the mean over `positions` (B, T) bool of KL(reference || edited), next-token distributions."""
    if logits_edited.shape != logits_reference.shape or positions.shape != logits_edited.shape[:2]:
        raise ValueError("next_token_kl: logits must have equal (B, T, V) shapes and positions (B, T)")
    if not positions.any(dim=-1).all():
        raise ValueError("next_token_kl: every row needs at least one position")
    log_p = logits_reference.float().log_softmax(dim=-1)
    log_q = logits_edited.float().log_softmax(dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (B, T)
    return (kl * positions).sum(dim=-1) / positions.sum(dim=-1)


@dataclass(frozen=True)
class _Row:
    example: int
    prompt: str
    answer: str  # what the row is teacher-forced on
    competitor: str | None  # the other answer (CounterFact metrics)


@dataclass
class ReferencePredictions:
    """The unedited model's top-1 tokens at the answer positions of every locality row, in order."""

    examples_hash: str
    predictions: list[torch.Tensor]  # one 1-D long tensor per locality row


@dataclass
class EvaluationResult:
    """Per-example scores in [0, 1]: one value per example, or per paraphrase / locality pair."""

    efficacy: list[float]
    generalisation: list[list[float]]
    specificity: list[list[float]]  # the paper's: against the locality answer (gold), not the old model
    retention: list[list[float]] | None  # agreement with the reference predictions (None without them)
    reference: ReferencePredictions  # this model's predictions on the locality rows

    def summary(self) -> dict[str, float]:
        """Means over all rows of each kind, as the paper pools them (NaN where there are none)."""

        def pooled(rows: list[list[float]]) -> float:
            values = [v for row in rows for v in row]
            return sum(values) / len(values) if values else math.nan

        summary = {
            "efficacy": pooled([self.efficacy]),
            "generalisation": pooled(self.generalisation),
            "specificity": pooled(self.specificity),
        }
        if self.retention is not None:
            summary["retention"] = pooled(self.retention)
        return summary


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # labels are never passed: Hugging Face would shift them again
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # type: ignore[no-any-return]


def _score_chunk(model: nn.Module, tokenizer: object, rows: Sequence[_Row], metric: Metric) -> tuple[torch.Tensor, ...]:
    """(scores (B,), top-1 predictions (B, T), answer mask (B, T)) of one chunk of rows."""
    device = next(model.parameters()).device
    prompts, answers = [r.prompt for r in rows], [r.answer for r in rows]
    if metric == "accuracy":
        batch = tokenise(tokenizer, prompts, answers).to(device)
        logits = _logits(model, batch.input_ids, batch.attention_mask)
        return token_accuracy(logits, batch.labels), logits.argmax(dim=-1), batch.answer_mask
    competitors = [r.competitor or "" for r in rows]
    batch, old_labels = tokenise_with_old(tokenizer, prompts, answers, competitors)
    batch = batch.to(device)
    logits = _logits(model, batch.input_ids, batch.attention_mask)
    if metric == "counterfact":
        scores = counterfact_token_scores(logits, batch.labels, old_labels.to(device))
    else:
        other = tokenise(tokenizer, prompts, competitors).to(device)
        other_logits = _logits(model, other.input_ids, other.attention_mask)
        scores = counterfact_sequence_success(logits, batch.labels, other_logits, other.labels)
    return scores, logits.argmax(dim=-1), batch.answer_mask


@torch.no_grad()
def _score_rows(
    model: nn.Module, tokenizer: object, rows: Sequence[_Row], metric: Metric, batch_size: int
) -> tuple[list[float], list[torch.Tensor]]:
    """Scores of `rows` and the model's top-1 tokens at each row's answer positions."""
    scores: list[float] = []
    predictions: list[torch.Tensor] = []
    for start in range(0, len(rows), batch_size):
        chunk_scores, top1, mask = _score_chunk(model, tokenizer, rows[start : start + batch_size], metric)
        scores += chunk_scores.tolist()
        predictions += [top1[b][mask[b]].cpu() for b in range(top1.shape[0])]
    return scores, predictions


def _group(values: Sequence[float], rows: Sequence[_Row], n_examples: int) -> list[list[float]]:
    grouped: list[list[float]] = [[] for _ in range(n_examples)]
    for value, row in zip(values, rows, strict=True):
        grouped[row.example].append(value)
    return grouped


def _retention(
    reference: ReferencePredictions,
    digest: str,
    predictions: list[torch.Tensor],
    rows: Sequence[_Row],
    n: int,
) -> list[list[float]]:
    if reference.examples_hash != digest or len(reference.predictions) != len(predictions):
        raise ValueError("reference predictions were computed for other examples; recompute them on these examples")
    values = [float((now == then).float().mean()) for now, then in zip(predictions, reference.predictions, strict=True)]
    return _group(values, rows, n)


def evaluate_examples(
    model: nn.Module,
    tokenizer: object,
    examples: Sequence[EditExample],
    *,
    metric: Metric = "accuracy",
    reference: ReferencePredictions | None = None,
    batch_size: int = 16,
) -> EvaluationResult:
    """Efficacy, generalisation, specificity and (given `reference`) retention of `examples` on `model`.

    `metric`: "accuracy" (paper ZsRE), "counterfact" (paper CounterFact, token-wise) or
    "counterfact_sequence" (ROME-style); the CounterFact metrics need `target_true` on every example
    and compare locality answers against `target_new`. Run it on the unedited model first and keep
    `result.reference`; pass it to the evaluation of the edited model to get retention. The model is
    only read (no gradients, no changes).
    """
    if metric != "accuracy" and any(e.target_true is None for e in examples):
        raise ValueError(f"metric {metric!r} needs target_true on every example; use metric='accuracy'")
    edit_rows = [_Row(i, e.prompt, e.target_new, e.target_true) for i, e in enumerate(examples)]
    para_rows = [_Row(i, p, e.target_new, e.target_true) for i, e in enumerate(examples) for p in e.rephrase_prompts]
    loc_rows = [_Row(i, p, a, e.target_new) for i, e in enumerate(examples) for p, a in e.locality]
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    efficacy, _ = _score_rows(model, tokenizer, edit_rows, metric, batch_size)
    general, _ = _score_rows(model, tokenizer, para_rows, metric, batch_size)
    # locality rows are teacher-forced on their own (true) answer, which must beat target_new
    special, predictions = _score_rows(model, tokenizer, loc_rows, metric, batch_size)
    n, digest = len(examples), examples_hash(examples)
    return EvaluationResult(
        efficacy=efficacy,
        generalisation=_group(general, para_rows, n),
        specificity=_group(special, loc_rows, n),
        retention=None if reference is None else _retention(reference, digest, predictions, loc_rows, n),
        reference=ReferencePredictions(digest, predictions),
    )
