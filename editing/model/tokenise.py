"""Tokenisation of (prompt, answer) pairs for editing and teacher-forced evaluation (spec §1.1).

For each pair:

1. the answer gets one leading space (its own surrounding whitespace removed first);
2. the prompt is tokenised with the tokenizer's special tokens (BOS where the tokenizer adds one), the
   answer without;
3. the input is prompt ++ answer[:-1]: the last answer token is never fed in;
4. the labels are pre-shifted: `labels[b, t]` is the target of `logits[b, t]`, so the answer tokens sit
   at the last prompt position and the answer positions after it; every other position holds -100;
5. no chat template, even for instruct models.

Rows are right-padded (`input_ids` with the pad id, `attention_mask` with 0, labels with -100). Never
pass `labels` to a Hugging Face forward: it would shift them a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editing.errors import DataFormatError

IGNORE_INDEX = -100


@dataclass
class TokenBatch:
    """A right-padded batch of teacher-forced (prompt, answer) rows."""

    input_ids: torch.Tensor  # (B, T) long, right-padded with the pad id
    attention_mask: torch.Tensor  # (B, T) long
    labels: (
        torch.Tensor
    )  # (B, T) long, pre-shifted: labels[b, t] is the target of logits[b, t]; -100 elsewhere
    strengths: torch.Tensor | None = None  # (B,) float: weight of each row's loss in an edit (None: all 1)

    def to(self, device: torch.device) -> TokenBatch:
        """The same batch on `device`."""
        strengths = self.strengths.to(device) if self.strengths is not None else None
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), strengths)

    @property
    def answer_mask(self) -> torch.Tensor:
        """(B, T) bool: the positions whose logits predict an answer token."""
        return self.labels != IGNORE_INDEX

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def pad_id(tokenizer: Any) -> int:
    """The id used for right padding: the pad token, else EOS, else 0 (padding is masked anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=special)["input_ids"]]


def encode_answer(tokenizer: Any, answer: str, prompt: str) -> list[int]:
    """The ids of " " + answer (stripped), without special tokens; DataFormatError if it is empty."""
    answer_ids = _encode(tokenizer, " " + answer.strip(), special=False)
    if not answer.strip() or not answer_ids:
        raise DataFormatError(f"answer {answer!r} (for prompt {prompt!r}) is empty; give a non-empty answer")
    return answer_ids


def encode_pair(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids with special tokens, answer ids as `encode_answer`); DataFormatError if either is empty."""
    prompt_ids = _encode(tokenizer, prompt, special=True)
    if not prompt_ids:
        raise DataFormatError(f"prompt {prompt!r} tokenises to no tokens; give a non-empty prompt")
    return prompt_ids, encode_answer(tokenizer, answer, prompt)


def tokenise(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> TokenBatch:
    """Tokenise `prompts[i]` teacher-forced on `answers[i]` into one right-padded batch (see module doc)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("nothing to tokenise: no prompts given")
    rows = [encode_pair(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    width = max(len(p) + len(a) - 1 for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, (p, a) in enumerate(rows):
        fed = p + a[:-1]
        input_ids[b, : len(fed)] = torch.tensor(fed)
        attention_mask[b, : len(fed)] = 1
        # the last prompt token predicts the first answer token
        labels[b, len(p) - 1 : len(fed)] = torch.tensor(a)
    return TokenBatch(input_ids, attention_mask, labels)


def tokenise_with_old(
    tokenizer: Any, prompts: Sequence[str], new_answers: Sequence[str], old_answers: Sequence[str]
) -> tuple[TokenBatch, torch.Tensor]:
    """A batch teacher-forced on `new_answers`, and `old_labels` for the competing `old_answers`.

    `old_labels` (B, T) holds the old answer's tokens starting at the same position as the new answer's
    labels (the last prompt token), -100 where the old answer has no token; tokens beyond the batch
    width T are cut off. This is the input of the CounterFact comparison (spec §8.2).
    """
    if len(old_answers) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(old_answers)} old answers")
    batch = tokenise(tokenizer, prompts, new_answers)
    width = batch.input_ids.shape[1]
    old_labels = torch.full_like(batch.labels, IGNORE_INDEX)
    # each row's first label position is its last prompt token
    starts = batch.answer_mask.int().argmax(dim=1).tolist()
    for b, (prompt, old) in enumerate(zip(prompts, old_answers, strict=True)):
        old_ids = encode_answer(tokenizer, old, prompt)
        start = starts[b]
        kept = old_ids[: width - start]
        old_labels[b, start : start + len(kept)] = torch.tensor(kept)
    return batch, old_labels
