"""Protected facts in the gate: answers the operator wants kept, checked on every try of every batch.

A protected fact is a prompt and an answer ("The CEO of Acme is" -> "Jane Roe"). What the gate keeps
is the model's own answer *before the batch*: teacher-forced on the protected answer, the most likely
next token at every answer position (the greedy answer, token by token, on the protected answer's
path). A try that changes any of these tokens for any protected fact fails, and the gate isolates the
fact that did it like any harmful fact (`editing.gate.checks`). This is strict (one flipped token is
a violation) and cheap: one forward pass over the protected rows per try, no generation. When the model
answered the protected answer before the batch, the check is exactly "it still does".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from editing.model.scoring import left_pad, tail_logits
from editing.model.tokenise import encode_pair, pad_id

#: The model's answer tokens on each protected fact, in the order of `ProtectedCheck.facts`.
Answers = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ProtectedFact:
    """A prompt whose answer must not change, and how to name it in a rejection."""

    prompt: str
    answer: str
    label: str  #: e.g. "'The CEO of Acme is' -> 'Jane Roe', protected.jsonl line 3"


class ProtectedCheck:
    """The model's answers on the protected facts, and which of them a try changed."""

    def __init__(self, facts: Sequence[ProtectedFact], batch_size: int) -> None:
        self.facts = tuple(facts)
        self.batch_size = max(1, batch_size)

    def __len__(self) -> int:
        return len(self.facts)

    def answers(self, model: nn.Module, tokenizer: Any) -> Answers:
        """The most likely token at each answer position of every protected fact (teacher-forced)."""
        if not self.facts:
            return ()
        pairs = [encode_pair(tokenizer, f.prompt, f.answer) for f in self.facts]
        out: list[tuple[int, ...]] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            batch = left_pad([p + a[:-1] for p, a in chunk], [a for _, a in chunk], pad_id(tokenizer))
            best = tail_logits(model, batch).argmax(dim=-1).cpu()  # (B, K)
            width = int(best.shape[1])
            for row, (_, answer) in zip(best, chunk, strict=True):
                out.append(tuple(int(t) for t in row[width - len(answer) :].tolist()))
        return tuple(out)

    def changed(self, before: Answers, after: Answers) -> list[ProtectedFact]:
        """The protected facts whose answer differs between `before` and `after`."""
        return [fact for fact, old, new in zip(self.facts, before, after, strict=True) if old != new]


def no_grad_answers(check: ProtectedCheck, model: nn.Module, tokenizer: Any) -> Answers:
    """`check.answers` without gradients (the gate measures in inference mode)."""
    with torch.no_grad():
        return check.answers(model, tokenizer)
