"""Locality beyond retention: how much an edit moved what the model says about everything else (docs/locality.md).

Retention (top-1 agreement with the unedited model on the locality prompts) punishes every flip of a position
where the unedited model was unsure, which on a 135M model is most of them. The measures here say more:

- per locality row of the edited facts (`row_locality`, pooled by `pool_rows`): retention, *confident
  retention* (agreement only where the unedited model's top-1 probability is at least `CONFIDENT`), *mean KL*
  (next-token KL(unedited ‖ edited) over the answer positions) and, on CounterFact, the neighbourhood score
  (the paper's token-wise P(true) > P(new) on the neighbourhood prompts; `scores.py` reports it for the stream);
- over the whole model (`measure_model`, against a `ModelReference` measured once on the unedited model):
  the mean KL on the standing prompts of `editing.gate.specificity`, *known-fact retention* (the share of facts
  the unedited model gets right, held apart from the edited ones, that it still gets right) and the GLUE-style
  probe flip rate.

Every comparison is with the unedited model, never with an earlier edited state. The unedited model's logits
on the locality rows are not stored (3,183 ZsRE answer positions × 49,152 tokens would take 626 MB): they are
recomputed next to the edited ones with the unedited weights swapped in (`base_weights`), which restores the
live weights bit for bit. Percentages ×100 like every report metric; KL in nats (`NATS`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editing.data import EditExample
from editing.engine.deltas import Snapshot, restore, snapshot
from editing.engine.emsedit import lm_logits
from editing.errors import ProbeDataError
from editing.gate.config import GateConfig
from editing.gate.probe_sets import ProbeTask, load_tasks_from_directory
from editing.gate.probes import choice_scores
from editing.gate.specificity import compare_distributions, standing_prompts
from editing.model.edit_metrics import agreement, counterfact_token_scores, next_token_kl
from editing.model.scoring import answer_scores, next_token_logprobs
from editing.model.tokenise import IGNORE_INDEX, TokenBatch, encode_answer, tokenise, tokenise_with_old

logger = logging.getLogger(__name__)

#: the unedited model's top-1 probability from which a position counts as confident
CONFIDENT = 0.5
#: metrics in nats (every other metric is a percentage)
NATS = ("mean_kl", "standing_kl")
#: the measures of this module as the report names them, in table order
LOCALITY_METRICS = ("confident_retention", "mean_kl", "standing_kl", "known_fact_retention", "probe_flip_rate")
#: what the unedited model scores on them, by definition
UNEDITED = {"confident_retention": 100.0, "mean_kl": 0.0, "standing_kl": 0.0, "known_fact_retention": 100.0,
            "probe_flip_rate": 0.0}


@dataclass(frozen=True)
class LocalityOptions:
    """How the locality measures are taken: the known facts, the probes and the null edits (docs/locality.md)."""

    known_facts: int = 100  # known facts to find (0: none)
    known_facts_data: str | None = None  # their source (None: the evaluation file's records outside the stream)
    probe_data: Path | None = None  # a directory of GLUE-style probe sets (None: no probes)
    probe_limit: int = 8  # items per probe task
    null_edit: bool = True  # measure the zero edit and each method's self edit
    null_batches: int = 4  # the null edits are measured on the locality rows of the stream's first batches

    def __post_init__(self) -> None:
        if min(self.known_facts, self.probe_limit, self.null_batches) < 0:
            raise ValueError("--known-facts, --probe-limit and the null-edit batches must be at least 0")


@dataclass(frozen=True)
class RowLocality:
    """Per-row values in [0, 1] (KL in nats) on the locality rows of some edited facts."""

    retention: tuple[float, ...]
    confident_retention: tuple[float, ...]  # only the rows with at least one confident position
    mean_kl: tuple[float, ...]
    neighbourhood_score: tuple[float, ...] | None = None  # CounterFact only


def _mean(values: Sequence[float], scale: float) -> float:
    return scale * sum(values) / len(values) if values else math.nan


def pool_rows(parts: Sequence[RowLocality]) -> dict[str, float]:
    """Every row of every part counts once: percentages, and `mean_kl` in nats."""
    out = {
        "retention": _mean([v for p in parts for v in p.retention], 100.0),
        "confident_retention": _mean([v for p in parts for v in p.confident_retention], 100.0),
        "mean_kl": _mean([v for p in parts for v in p.mean_kl], 1.0),
    }
    if parts and all(p.neighbourhood_score is not None for p in parts):
        out["neighbourhood_score"] = _mean([v for p in parts for v in p.neighbourhood_score or ()], 100.0)
    return out


@contextmanager
def base_weights(model: nn.Module, base: Snapshot) -> Iterator[None]:
    """Within the block the edited modules hold the unedited weights of `base`; the live ones come back after."""
    live = snapshot(model, list(base.weights))
    restore(model, base)
    try:
        yield
    finally:
        restore(model, live)


def confident_labels(reference: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`labels` (B, T) with -100 wherever the top-1 probability of `reference` logits (B, T, V) is below CONFIDENT."""
    top1 = (reference.amax(dim=-1) - reference.logsumexp(dim=-1)).exp()
    return labels.masked_fill(top1 < CONFIDENT, IGNORE_INDEX)


def _chunk(
    model: nn.Module, batch: TokenBatch, old_labels: torch.Tensor | None, base: Snapshot
) -> tuple[list[float], list[float], list[float], list[float]]:
    with base_weights(model, base):
        reference = lm_logits(model, batch).float()
    edited = lm_logits(model, batch).float()
    confident = confident_labels(reference, batch.labels)
    sure = (confident != IGNORE_INDEX).any(dim=-1)
    neighbourhood = [] if old_labels is None else counterfact_token_scores(edited, batch.labels, old_labels).tolist()
    return (
        agreement(edited, reference, batch.labels).tolist(),
        agreement(edited[sure], reference[sure], confident[sure]).tolist() if sure.any() else [],
        next_token_kl(edited, reference, batch.answer_mask).tolist(),
        neighbourhood,
    )


@torch.no_grad()
def row_locality(
    model: nn.Module, tokenizer: Any, examples: Sequence[EditExample], base: Snapshot, *, counterfact: bool,
    batch_size: int = 16,
) -> RowLocality:
    """The locality rows of `examples` on the live model against the unedited weights `base`.

    Rows are tokenised and batched as `editing.model.edit_metrics.evaluate_examples` does, so `retention` is the
    report's retention exactly. With `counterfact` the rows are also scored against `target_new` (the paper's
    token-wise comparison).
    """
    rows = [(p, a, e.target_new) for e in examples for p, a in e.locality]
    device = next(model.parameters()).device
    parts: tuple[list[float], ...] = ([], [], [], [])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts, answers = [r[0] for r in chunk], [r[1] for r in chunk]
        old: torch.Tensor | None = None
        if counterfact:  # the locality answer must beat target_new (the paper's LS)
            batch, old = tokenise_with_old(tokenizer, prompts, answers, [r[2] for r in chunk])
            old = old.to(device)
        else:
            batch = tokenise(tokenizer, prompts, answers)
        for total, values in zip(parts, _chunk(model, batch.to(device), old, base), strict=True):
            total += values
    return RowLocality(tuple(parts[0]), tuple(parts[1]), tuple(parts[2]), tuple(parts[3]) if counterfact else None)


@dataclass(frozen=True)
class KnownFacts:
    """Facts the unedited model gets right (every answer token top-1, teacher-forced), held apart from the stream."""

    pairs: tuple[tuple[str, str], ...]
    screened: int  # candidates scored to find them
    candidates: int  # candidates there were


def known_fact_candidates(facts: Sequence[EditExample], stream: Sequence[EditExample]) -> list[tuple[str, str]]:
    """(prompt, true answer) pairs of `facts`: each fact's prompt with its true target, and its locality pairs.

    A pair whose prompt is a prompt, paraphrase or locality prompt of the `stream` is left out (an edit may
    rightly change it, or it is measured already); duplicates are dropped.
    """
    taken = {p for e in stream for p in (e.prompt, *e.rephrase_prompts, *(q for q, _ in e.locality))}
    pairs = [((e.prompt, e.target_true),) if e.target_true else () for e in facts]
    candidates = [pair for e, own in zip(facts, pairs, strict=True) for pair in (*own, *e.locality)]
    return list(dict.fromkeys(pair for pair in candidates if pair[0] not in taken))


def _right(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[bool]:
    if not pairs:
        return []
    scores = answer_scores(model, tokenizer, [p for p, _ in pairs], [a for _, a in pairs], batch_size)
    return [bool(v == 1.0) for v in scores.token_accuracy.tolist()]


def select_known_facts(
    model: nn.Module, tokenizer: Any, candidates: Sequence[tuple[str, str]], n: int, *, seed: int, batch_size: int = 16,
) -> KnownFacts:
    """Up to `n` of `candidates`, drawn in an order shuffled with `seed`, that the (unedited) model gets right.

    The kept set is scored again as a whole until every fact of it is right in that very computation (the
    batches a fact is scored in move its logits in the last digits), so that an unchanged model keeps exactly
    100 % of them.
    """
    order = list(candidates)
    random.Random(f"known-facts:{seed}").shuffle(order)
    kept: list[tuple[str, str]] = []
    screened = 0
    while len(kept) < n and screened < len(order):
        chunk = order[screened : screened + max(4 * batch_size, n - len(kept))]
        screened += len(chunk)
        kept += [pair for pair, right in zip(chunk, _right(model, tokenizer, chunk, batch_size), strict=True) if right]
    return KnownFacts(_stable(model, tokenizer, kept[:n], batch_size), screened, len(order))


def _stable(model: nn.Module, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int) -> tuple[tuple[str, str], ...]:
    """`pairs` without those that fail when the set is scored as a whole, repeated until none fails."""
    while pairs:
        right = _right(model, tokenizer, pairs, batch_size)
        if all(right):
            break
        pairs = [pair for pair, ok in zip(pairs, right, strict=True) if ok]
    return tuple(pairs)


def _answer_tokens(tokenizer: Any, vocabulary: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, rest): (V,) bool masks of the tokens an edit target can start with and continue with.

    Every target is tokenised as " " + answer (`editing.model.tokenise`), so it starts with a space; no
    target holds a line break or a special token.
    """
    ids = list(range(min(vocabulary, len(tokenizer))))
    texts, pieces = tokenizer.batch_decode([[i] for i in ids]), tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    rest = [i not in special and bool(text) and "\n" not in text for i, text in zip(ids, texts, strict=True)]
    # byte-level BPE decodes a word-initial token with its space; SentencePiece marks it only in the piece
    spaced = [text.startswith(" ") or str(piece).startswith(("Ġ", "▁")) for text, piece in zip(texts, pieces, strict=True)]
    first = [ok and space and bool(text.strip()) for ok, space, text in zip(rest, spaced, texts, strict=True)]
    padding = [False] * (vocabulary - len(ids))  # rows of the output layer beyond the tokenizer's vocabulary
    return torch.tensor(first + padding), torch.tensor(rest + padding)


@torch.no_grad()
def _own_answer(model: nn.Module, tokenizer: Any, prompt: str, n_tokens: int, masks: tuple[torch.Tensor, torch.Tensor]) -> str:
    """The model's greedy answer of `n_tokens` among the tokens a target can hold; "" if it does not tokenise back."""
    ids = [int(i) for i in tokenizer(prompt, add_special_tokens=True)["input_ids"]]
    answer: list[int] = []
    for step in range(n_tokens):
        logits = model(input_ids=torch.tensor([ids + answer], device=next(model.parameters()).device)).logits[0, -1]
        allowed = masks[0 if step == 0 else 1].to(logits.device)
        answer.append(int(logits.float().masked_fill(~allowed, float("-inf")).argmax()))
    text = tokenizer.decode(answer).strip()
    return text if text and encode_answer(tokenizer, text, prompt) == answer else ""


def self_edit_facts(model: nn.Module, tokenizer: Any, facts: Sequence[EditExample]) -> list[EditExample]:
    """`facts` with each target replaced by the (unedited) model's own greedy answer to the prompt.

    The answer has as many tokens as the fact's real target (an edit of the same size that asks for what the
    model already says) and the form of every target: it starts with a space and holds no line break or
    special token, so where the model would rather break the line first (an instruction-tuned model after a
    question), it is the model's most likely answer of that form. Facts whose answer does not tokenise back
    to the same tokens are left out.
    """
    masks = _answer_tokens(tokenizer, int(model.get_output_embeddings().weight.shape[0]))  # type: ignore[operator]
    out = []
    for fact in facts:
        size = len(encode_answer(tokenizer, fact.target_new, fact.prompt))
        answer = _own_answer(model, tokenizer, fact.prompt, size, masks)
        if answer:
            out.append(replace(fact, target_new=answer))
    return out


def load_probes(directory: Path | None, limit: int, seed: int) -> tuple[list[ProbeTask], str]:
    """The default GLUE-style probe tasks in `directory`, `limit` items each, and a note when there are none."""
    if directory is None or limit == 0:
        return [], "probes not measured (no probe directory, or --probe-limit 0)"
    if not directory.is_dir():
        return [], f"probes not measured: the probe directory {directory} does not exist"
    try:
        return load_tasks_from_directory(directory, GateConfig(probe_data=directory, probe_items=limit, probe_seed=seed)), ""
    except ProbeDataError as exc:
        return [], f"probes not measured: {exc}"


@dataclass(frozen=True)
class ModelReference:
    """The unedited model's side of the whole-model measures, and the facts of the self edit."""

    options: LocalityOptions
    standing: tuple[str, ...]
    standing_logprobs: torch.Tensor  # (N, V) next-token log-probabilities of the standing prompts
    known: KnownFacts
    probes: tuple[ProbeTask, ...] = ()
    probe_predictions: tuple[torch.Tensor, ...] = ()  # per task, (items,) long
    self_batch: tuple[EditExample, ...] = ()  # the first batch with the model's own answers as targets
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    probe_base_accuracy: float | None = None  # the unedited model's pooled probe accuracy

    def unedited(self) -> dict[str, float]:
        """The unedited model's values of the measures this reference can measure (by definition)."""
        left_out = {"known_fact_retention": not self.known.pairs, "probe_flip_rate": not self.probes,
                    "standing_kl": not self.standing}
        return {name: value for name, value in UNEDITED.items() if not left_out.get(name, False)}

    def describe(self) -> dict[str, Any]:
        """What was measured, for the report's `locality` section."""
        return {
            "confidence_threshold": CONFIDENT,
            "known_facts": len(self.known.pairs),
            "known_facts_screened": self.known.screened,
            "known_facts_candidates": self.known.candidates,
            "known_facts_source": self.options.known_facts_data or "the evaluation file's facts outside the stream",
            "standing_prompts": len(self.standing),
            "probe_data": str(self.options.probe_data) if self.probes else None,
            "probe_tasks": [task.name for task in self.probes],
            "probe_items": sum(len(task.items) for task in self.probes),
            "probe_base_accuracy": None if self.probe_base_accuracy is None else round(100 * self.probe_base_accuracy, 2),
            "self_edit_facts": len(self.self_batch),
            "null_edit_batches": self.options.null_batches if self.options.null_edit else 0,
            "reference_seconds": round(self.seconds, 1),
            "notes": list(self.notes),
        }


def _probe_predictions(model: nn.Module, tokenizer: Any, tasks: Sequence[ProbeTask], batch_size: int) -> list[torch.Tensor]:
    return [choice_scores(model, tokenizer, task, batch_size).argmax(dim=-1) for task in tasks]


def measure_reference(
    model: nn.Module, tokenizer: Any, stream: Sequence[Sequence[EditExample]], pool: Sequence[EditExample],
    options: LocalityOptions, *, seed: int, batch_size: int = 16,
) -> ModelReference:
    """Measure the unedited `model` once: standing prompts, known facts from `pool`, probes, self-edit targets."""
    began = time.perf_counter()
    edited = [fact for batch in stream for fact in batch]
    notes = []
    candidates = known_fact_candidates(pool, edited) if options.known_facts else []
    known = select_known_facts(model, tokenizer, candidates, options.known_facts, seed=seed, batch_size=batch_size)
    if options.known_facts and len(known.pairs) < options.known_facts:
        notes.append(f"{len(known.pairs)} known facts found of {options.known_facts} asked, in {known.candidates} candidates")
    tasks, note = load_probes(options.probe_data, options.probe_limit, seed)
    notes += [note] if note else []
    predictions = _probe_predictions(model, tokenizer, tasks, batch_size)
    labels = [torch.tensor([item.label for item in task.items]) for task in tasks]
    right = sum(int((p == y).sum()) for p, y in zip(predictions, labels, strict=True))
    prompts = standing_prompts()
    reference = ModelReference(
        options=options,
        standing=tuple(prompts),
        standing_logprobs=next_token_logprobs(model, tokenizer, prompts, batch_size),
        known=known,
        probes=tuple(tasks),
        probe_predictions=tuple(predictions),
        self_batch=tuple(self_edit_facts(model, tokenizer, stream[0])) if options.null_edit and stream else (),
        notes=tuple(notes),
        seconds=time.perf_counter() - began,
        probe_base_accuracy=right / sum(len(y) for y in labels) if tasks else None,
    )
    logger.info(
        "locality reference: %d known facts (%d candidates screened), %d probe items, %d self-edit facts, %.0f s",
        len(known.pairs), known.screened, sum(len(p) for p in predictions),
        len(reference.self_batch), reference.seconds,
    )
    return reference


def measure_model(
    model: nn.Module, tokenizer: Any, reference: ModelReference, *, probes: bool = True, batch_size: int = 16
) -> dict[str, float]:
    """Standing-prompt KL (nats), known-fact retention and (with `probes`) the probe flip rate, in %.

    A measure without its data (no known facts, no probe directory) is left out.
    """
    out: dict[str, float] = {}
    if reference.standing:
        live = next_token_logprobs(model, tokenizer, list(reference.standing), batch_size)
        out["standing_kl"] = compare_distributions(reference.standing_logprobs, live).mean_kl
    if reference.known.pairs:
        right = _right(model, tokenizer, reference.known.pairs, batch_size)
        out["known_fact_retention"] = 100.0 * sum(right) / len(right)
    if probes and reference.probes:
        now = _probe_predictions(model, tokenizer, reference.probes, batch_size)
        flips = sum(int((a != b).sum()) for a, b in zip(now, reference.probe_predictions, strict=True))
        out["probe_flip_rate"] = 100.0 * flips / sum(len(p) for p in now)
    return out
