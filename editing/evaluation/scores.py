"""Scores of one edit batch and their pooling into report metrics (spec §8, docs/evaluation.md).

`score_batch` runs `editing.model.edit_metrics.evaluate_examples` on one batch of facts and keeps the per-row values:
the paper's metrics (ZsRE: teacher-forced token accuracy; CounterFact: the token-wise comparison of new and
old targets) and the clean ones (retention: top-1 agreement with the unedited model on the locality rows;
CounterFact: the ROME-style whole-answer comparison). `pool` averages rows over any number of batches the
way the paper does (every row counts once, unweighted) and returns percentages. The locality measures of
`locality.py` (confident retention, mean KL) join them when the harness has measured them, and CounterFact's
neighbourhood score is the paper's LS under the name the locality reports use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from editing.data import EditExample
from editing.evaluation.locality import RowLocality, pool_rows
from editing.model.edit_metrics import EvaluationResult, Metric, ReferencePredictions, evaluate_examples

DataKind = Literal["zsre", "counterfact"]

#: the report's metric names, in table order (percentages; `average` is the mean of the paper's three)
PAPER_METRICS = ("efficacy", "generalization", "specificity")
CLEAN_METRICS = ("retention", "efficacy_sequence", "generalization_sequence", "specificity_sequence")
#: CounterFact: P(true) > P(new) on the neighbourhood prompts, token-wise (the paper's LS, 68.8 unedited)
NEIGHBOURHOOD = "neighbourhood_score"


@dataclass(frozen=True)
class BatchScores:
    """Per-row scores in [0, 1] of one edit batch on one model state (paraphrase and locality rows flattened)."""

    efficacy: tuple[float, ...]
    generalization: tuple[float, ...]
    specificity: tuple[float, ...]
    retention: tuple[float, ...] | None = None
    efficacy_sequence: tuple[float, ...] | None = None  # CounterFact, ROME-style
    generalization_sequence: tuple[float, ...] | None = None
    specificity_sequence: tuple[float, ...] | None = None
    neighbourhood_score: tuple[float, ...] | None = None  # CounterFact: the paper's specificity rows
    locality: RowLocality | None = None  # the locality rows against the unedited model (`locality.row_locality`)


def _flat(rows: list[list[float]]) -> tuple[float, ...]:
    return tuple(v for row in rows for v in row)


def _paper(result: EvaluationResult) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    return tuple(result.efficacy), _flat(result.generalisation), _flat(result.specificity)


def score_batch(
    model: nn.Module,
    tokenizer: object,
    examples: Sequence[EditExample],
    kind: DataKind,
    reference: ReferencePredictions | None = None,
    *,
    batch_size: int = 16,
) -> tuple[BatchScores, ReferencePredictions]:
    """Scores of `examples` on `model` and the model's own locality predictions (the reference of later calls).

    Retention is scored only when `reference` (the unedited model's predictions on these examples) is given.
    """
    metric: Metric = "accuracy" if kind == "zsre" else "counterfact"
    result = evaluate_examples(model, tokenizer, examples, metric=metric, reference=reference, batch_size=batch_size)
    efficacy, general, special = _paper(result)
    retention = _flat(result.retention) if result.retention is not None else None
    if kind == "zsre":
        return BatchScores(efficacy, general, special, retention), result.reference
    whole = evaluate_examples(model, tokenizer, examples, metric="counterfact_sequence", batch_size=batch_size)
    seq_e, seq_g, seq_s = _paper(whole)
    return BatchScores(efficacy, general, special, retention, seq_e, seq_g, seq_s, special), result.reference


def _mean(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else math.nan


def pool(batches: Sequence[BatchScores]) -> dict[str, float]:
    """Percentages over all rows of all batches, plus `average` (paper) and `clean_average`.

    `average` is the mean of efficacy, generalization and specificity (the paper's three). `clean_average`
    is the mean of efficacy, generalization and retention, with the whole-answer variants of efficacy and
    generalization on CounterFact. With every batch's `locality` measured, `confident_retention` (%) and
    `mean_kl` (nats) join them.
    """
    out: dict[str, float] = {}
    for name in (*PAPER_METRICS, *CLEAN_METRICS, NEIGHBOURHOOD):
        parts = [getattr(b, name) for b in batches]
        if parts and all(p is not None for p in parts):
            out[name] = _mean([v for p in parts for v in p])
    out["average"] = sum(out[m] for m in PAPER_METRICS) / len(PAPER_METRICS)
    clean = [out.get("efficacy_sequence", out["efficacy"]), out.get("generalization_sequence", out["generalization"])]
    if "retention" in out:
        out["clean_average"] = (sum(clean) + out["retention"]) / 3
    rows = [b.locality for b in batches]
    if rows and all(r is not None for r in rows):
        pooled = pool_rows([r for r in rows if r is not None])
        out |= {name: pooled[name] for name in ("confident_retention", "mean_kl")}
    return out
