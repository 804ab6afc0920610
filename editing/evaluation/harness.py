"""Runs one prepared method over a stream of edit batches and measures it (docs/evaluation.md).

Modes:
- `sequential`: the batches are edited one after the other and every edit is kept (lifelong editing);
  all metrics are measured on the **final** model, after the last batch, over every edited batch
  (spec §7.3). With `curve_every` = k the facts edited so far are also measured after every k-th batch.
- `batch`: every batch is edited on the unedited model and measured, then the model and the editor
  state are restored before the next one (independent batch edits).

Invariant: the model's weights and the method's editor state are the same after `run_stream` as before,
even when it raises.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from torch import nn
from tqdm import tqdm

from editing.data import EditExample
from editing.engine.deltas import apply, master_copies, restore, snapshot
from editing.evaluation.methods import PreparedMethod
from editing.evaluation.scores import BatchScores, DataKind, pool, score_batch
from editing.model.edit_metrics import ReferencePredictions

Mode = Literal["sequential", "batch"]


@dataclass(frozen=True)
class Baseline:
    """The unedited model's scores and locality predictions, per edit batch."""

    scores: list[BatchScores]
    references: list[ReferencePredictions]


def measure_baseline(
    model: nn.Module, tokenizer: object, batches: Sequence[Sequence[EditExample]], kind: DataKind, eval_batch_size: int = 16
) -> Baseline:
    """Score every batch on the (unedited) model and keep its locality predictions as the retention reference.

    Its own retention is 100 % by definition.
    """
    scores, references = [], []
    for batch in batches:
        batch_scores, reference = score_batch(model, tokenizer, batch, kind, batch_size=eval_batch_size)
        # the unedited model agrees with itself everywhere
        scores.append(replace(batch_scores, retention=tuple(1.0 for _ in batch_scores.specificity)))
        references.append(reference)
    return Baseline(scores, references)


@dataclass
class StreamResult:
    """What one method did on one stream: final metrics, per-batch metrics, the curve and the seconds."""

    final: dict[str, float]
    per_batch: list[dict[str, float]]  # batch i's facts scored on the final model (sequential) or after its edit
    curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (batches applied, all edited so far)
    edit_seconds: float = 0.0
    edit_cpu_seconds: float = 0.0
    edited_facts: int = 0
    edit_losses: list[float] = field(default_factory=list)  # loss of each batch before its edit


def _score_all(
    model: nn.Module, tokenizer: object, batches: Sequence[Sequence[EditExample]], baseline: Baseline,
    kind: DataKind, eval_batch_size: int,
) -> list[BatchScores]:
    return [
        score_batch(model, tokenizer, batch, kind, reference, batch_size=eval_batch_size)[0]
        for batch, reference in zip(batches, baseline.references, strict=False)
    ]


def run_stream(
    method: PreparedMethod,
    model: nn.Module,
    tokenizer: object,
    batches: Sequence[Sequence[EditExample]],
    baseline: Baseline,
    kind: DataKind,
    *,
    mode: Mode = "sequential",
    curve_every: int = 0,
    eval_batch_size: int = 16,
    progress: bool = False,
    label: str = "",
) -> StreamResult:
    """Edit `batches` with `method` in `mode` and measure (see the module docstring)."""
    if len(baseline.references) != len(batches):
        raise ValueError(f"the baseline covers {len(baseline.references)} batches, the stream has {len(batches)}")
    names = method.module_names
    saved, state = snapshot(model, names), method.state()
    masters = master_copies(model, names)
    result = StreamResult(final={}, per_batch=[])
    per_batch: list[BatchScores] = []
    try:
        for k, batch in enumerate(tqdm(batches, desc=label or method.spec.name, disable=not progress)):
            began, cpu = time.perf_counter(), time.process_time()
            plan = method.editor.propose(batch, masters)
            apply(model, plan, masters)
            method.adopt(plan)
            result.edit_seconds += time.perf_counter() - began
            result.edit_cpu_seconds += time.process_time() - cpu
            result.edited_facts += len(batch)
            result.edit_losses.append(plan.steps[0].edit_loss if plan.steps else float("nan"))
            if mode == "batch":
                reference = baseline.references[k : k + 1]
                per_batch += _score_all(model, tokenizer, [batch], Baseline([], reference), kind, eval_batch_size)
                restore(model, saved)
                masters = master_copies(model, names)
                method.load_state(state)
            elif curve_every and ((k + 1) % curve_every == 0 or k + 1 == len(batches)):
                so_far = _score_all(model, tokenizer, batches[: k + 1], baseline, kind, eval_batch_size)
                result.curve.append((k + 1, pool(so_far)))
                if k + 1 == len(batches):
                    per_batch = so_far
        if mode == "sequential" and not per_batch:
            per_batch = _score_all(model, tokenizer, batches, baseline, kind, eval_batch_size)
    finally:
        restore(model, saved)
        method.load_state(state)
    result.final = pool(per_batch)
    result.per_batch = [pool([scores]) for scores in per_batch]
    return result
