"""Runs one prepared method over a stream of edit batches and measures it (docs/evaluation.md).

Modes:
- `sequential`: the batches are edited one after the other and every edit is kept (lifelong editing);
  all metrics are measured on the **final** model, after the last batch, over every edited batch
  (spec §7.3). With `curve_every` = k the facts edited so far are also measured after every k-th batch.
- `batch`: every batch is edited on the unedited model and measured, then the model and the editor
  state are restored before the next one (independent batch edits).

With the unedited model's `locality.ModelReference`, the locality measures (docs/locality.md) are measured
at the same points, and `measure_null_edit` measures them after a null edit: the zero edit, or a method's
self edit.

A routed method (`PreparedMethod.router`) is edited and measured as it would serve: inside
`editing.engine.mentions.mention_routed`, each batch's mention keys stored before it is edited (`served`).

Invariant: the model's weights, the method's editor state and its router's keys are the same after
`run_stream` (and `measure_null_edit`) as before, even when it raises.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from editing.data import EditExample
from editing.engine.deltas import EditPlan, Snapshot, apply, master_copies, restore, snapshot
from editing.engine.mentions import mention_keys, mention_routed
from editing.engine.routing import base_weights
from editing.evaluation.locality import ModelReference, measure_model, pool_rows, row_locality
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
    null_edit: dict[str, float] = field(default_factory=dict)  # the locality measures after the self edit
    locality_seconds: float = 0.0  # spent on the locality measures (`locality.py`), the self edit included


@dataclass
class _Measure:
    """Scores edited batches on the live model; with `locality`, the locality measures against `base` too."""

    model: nn.Module
    tokenizer: object
    kind: DataKind
    batch_size: int
    base: Snapshot
    locality: ModelReference | None
    seconds: float = 0.0  # spent on the locality measures

    def batches(self, batches: Sequence[Sequence[EditExample]], references: Sequence[ReferencePredictions]) -> list[BatchScores]:
        out = []
        for batch, reference in zip(batches, references, strict=False):
            scores = score_batch(self.model, self.tokenizer, batch, self.kind, reference, batch_size=self.batch_size)[0]
            if self.locality is not None:
                began = time.perf_counter()
                rows = row_locality(self.model, self.tokenizer, batch, self.base, counterfact=self.kind == "counterfact",
                                    batch_size=self.batch_size)
                scores = replace(scores, locality=rows)
                self.seconds += time.perf_counter() - began
            out.append(scores)
        return out

    def whole(self, *, probes: bool) -> dict[str, float]:
        """The whole-model locality measures (empty without `locality`)."""
        if self.locality is None:
            return {}
        began = time.perf_counter()
        out = measure_model(self.model, self.tokenizer, self.locality, probes=probes, batch_size=self.batch_size)
        self.seconds += time.perf_counter() - began
        return out


def _mean_of(measures: Sequence[dict[str, float]]) -> dict[str, float]:
    names = dict.fromkeys(name for m in measures for name in m)
    return {name: sum(m[name] for m in measures) / len(measures) for name in names if all(name in m for m in measures)}


class Serving:
    """What `served` yields: `remember(batch)` makes a batch's edits reachable, `forget()` undoes the last one."""

    def __init__(self, method: PreparedMethod, model: nn.Module, tokenizer: object) -> None:
        self.method, self.model, self.tokenizer = method, model, tokenizer
        self.added = 0

    def remember(self, batch: Sequence[EditExample]) -> None:
        router = self.method.router
        if router is not None:
            router.keys.add(mention_keys(self.model, self.tokenizer, router, [f.prompt for f in batch], [f.subject for f in batch]))
            self.added += 1

    def forget(self) -> None:
        if self.method.router is not None and self.added:
            self.method.router.keys.pop()
            self.added -= 1


@contextmanager
def served(method: PreparedMethod, model: nn.Module, tokenizer: object) -> Iterator[Serving]:
    """The model as `method` serves it.

    Unrouted methods: the plain model; `remember` and `forget` do nothing. Routed methods: the model routed by
    mentions, with the current weights of the edited modules as the base (enter it on the unedited model);
    a remembered batch's mention keys act from the next forward on. Keys stored here are removed on exit.
    """
    serving = Serving(method, model, tokenizer)
    if method.router is None:
        yield serving
        return
    try:
        with mention_routed(model, base_weights(model, method.module_names), method.router):
            yield serving
    finally:
        while serving.added:
            serving.forget()


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
    locality: ModelReference | None = None,
) -> StreamResult:
    """Edit `batches` with `method` in `mode` and measure (see the module docstring).

    With `locality` (the unedited model's `ModelReference`) the locality measures of `locality.py` join the
    metrics: per batch, at every curve point (the probes only at the last) and, in batch mode, after every
    batch (without the probes); and, when the reference holds self-edit facts, the method's self edit.
    """
    if len(baseline.references) != len(batches):
        raise ValueError(f"the baseline covers {len(baseline.references)} batches, the stream has {len(batches)}")
    names = method.module_names
    saved, state = snapshot(model, names), method.state()
    masters = master_copies(model, names)
    result = StreamResult(final={}, per_batch=[])
    measure = _Measure(model, tokenizer, kind, eval_batch_size, saved, locality)
    per_batch: list[BatchScores] = []
    whole: list[dict[str, float]] = []  # the whole-model measures of each batch (batch mode) or of the final model
    try:
        with served(method, model, tokenizer) as serving:
            for k, batch in enumerate(tqdm(batches, desc=label or method.spec.name, disable=not progress)):
                began, cpu = time.perf_counter(), time.process_time()
                serving.remember(batch)
                plan = method.editor.propose(batch, masters)
                apply(model, plan, masters)
                method.adopt(plan)
                result.edit_seconds += time.perf_counter() - began
                result.edit_cpu_seconds += time.process_time() - cpu
                result.edited_facts += len(batch)
                result.edit_losses.append(plan.steps[0].edit_loss if plan.steps else float("nan"))
                last = k + 1 == len(batches)
                if mode == "batch":
                    per_batch += measure.batches([batch], baseline.references[k : k + 1])
                    whole.append(measure.whole(probes=False))
                    restore(model, saved)
                    masters = master_copies(model, names)
                    method.load_state(state)
                    serving.forget()  # batch mode: each batch alone on the unedited model
                elif curve_every and ((k + 1) % curve_every == 0 or last):
                    so_far = measure.batches(batches[: k + 1], baseline.references)
                    point = measure.whole(probes=last)
                    result.curve.append((k + 1, pool(so_far) | point))
                    if last:
                        per_batch, whole = so_far, [point]
            if mode == "sequential" and not per_batch:
                per_batch = measure.batches(batches, baseline.references)
                whole = [measure.whole(probes=True)]
    finally:
        restore(model, saved)
        method.load_state(state)
    result.final = pool(per_batch) | _mean_of(whole)
    result.per_batch = [pool([scores]) | (whole[i] if mode == "batch" else {}) for i, scores in enumerate(per_batch)]
    if locality is not None and locality.self_batch:
        began = time.perf_counter()
        result.null_edit = measure_null_edit(model, tokenizer, batches, kind, locality, method=method,
                                             eval_batch_size=eval_batch_size)
        measure.seconds += time.perf_counter() - began
    result.locality_seconds = measure.seconds
    return result


def measure_null_edit(
    model: nn.Module,
    tokenizer: object,
    batches: Sequence[Sequence[EditExample]],
    kind: DataKind,
    reference: ModelReference,
    *,
    method: PreparedMethod | None = None,
    module_names: Sequence[str] = (),
    eval_batch_size: int = 16,
) -> dict[str, float]:
    """Every locality measure after one null edit of the unedited `model` (restored after, with the method's state).

    Without `method`, the zero edit: ΔW = 0 on every module of `module_names`, applied as every edit is. It
    checks the measurement itself: retention and confident retention 100, both KLs 0, known facts 100, no
    probe flip, exactly. With `method`, its edit of `reference.self_batch` (facts whose targets are the
    unedited model's own answers): it should change nothing, and what it changes is the method's noise floor.
    The row measures cover the locality rows of the first `reference.options.null_batches` batches.
    """
    names = method.module_names if method is not None else list(module_names)
    saved, masters = snapshot(model, names), master_copies(model, names)
    state = method.state() if method is not None else {}
    try:
        with served(method, model, tokenizer) if method is not None else nullcontext() as serving:
            if method is None:
                plan = EditPlan({name: torch.zeros_like(weight) for name, weight in masters.items()})
            else:
                assert serving is not None
                serving.remember(reference.self_batch)
                plan = method.editor.propose(list(reference.self_batch), masters)
            apply(model, plan, masters)
            rows = [
                row_locality(model, tokenizer, batch, saved, counterfact=kind == "counterfact", batch_size=eval_batch_size)
                for batch in batches[: reference.options.null_batches]
            ]
            return pool_rows(rows) | measure_model(model, tokenizer, reference, batch_size=eval_batch_size)
    finally:
        restore(model, saved)
        if method is not None:
            method.load_state(state)
