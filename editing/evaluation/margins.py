"""How clear a lead is: a paired bootstrap of one method's advantage over another across the edit batches.

Every method of a report edits the same facts in the same order, and the report keeps each row's metrics per
edited batch on the final model (`sequences.<row>.per_batch`). The advantage of method A over method B in a
metric is the mean over batches of A's value minus B's. Resampling the batches with replacement (the same
batches for both methods: a paired bootstrap) gives a percentile interval for that mean: how much of the
difference the choice of facts alone could produce. The batch, not the fact, is the unit because the facts of
one batch are edited together and share its fate.

What this interval does not contain: the noise of training the editor again (meta-training is not
bit-reproducible across machines and thread counts) and of other fact orders or seeds. A lead inside the
interval is not shown to be real; a lead outside it is a lead on these facts for these trained editors.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Margin:
    """`method` minus `other` in `metric` (percentage points), with its bootstrap interval."""

    method: str
    other: str
    metric: str
    difference: float
    low: float
    high: float
    batches: int

    @property
    def clear(self) -> bool:
        """True when the whole interval lies on one side of zero."""
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, samples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean of a − b, low, high): the mean paired difference and its percentile bootstrap interval.

    `a` and `b` are per-batch values of the same batches; pairs where either is NaN are left out.
    ValueError when no pair is left or the inputs differ in length.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values differ in length: {len(a)} against {len(b)}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    diffs = [x - y for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    if not diffs:
        raise ValueError("no batch has a value for both methods")
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    tail = (1 - level) / 2
    low = means[min(samples - 1, math.floor(tail * samples))]
    high = means[max(0, math.ceil((1 - tail) * samples) - 1)]
    return sum(diffs) / n, low, high


def _values(report: dict[str, Any], label: str, metric: str) -> list[float]:
    per_batch = report.get("sequences", {}).get(label, {}).get("per_batch", [])
    return [math.nan if m.get(metric) is None else float(m[metric]) for m in per_batch]


def margins(report: dict[str, Any], method: str, others: Sequence[str], metric: str = "average") -> list[Margin]:
    """`method`'s margin over each of `others` in `metric`, from the report's per-batch sequences.

    Rows without per-batch values for the metric (or with another number of batches) are skipped.
    """
    mine = _values(report, method, metric)
    out = []
    for other in others:
        theirs = _values(report, other, metric)
        if other == method or not mine or len(theirs) != len(mine):
            continue
        try:
            difference, low, high = paired_bootstrap(mine, theirs)
        except ValueError:
            continue
        out.append(Margin(method, other, metric, difference, low, high, len(mine)))
    return out


def combine(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The rows and per-batch sequences of several reports of one evaluation, as one report for `margins`.

    The reports must measure one evaluation (`report.check_comparable`); ValueError otherwise.
    """
    from editing.evaluation.report import check_comparable  # here: report imports this module

    for other in reports[1:]:
        check_comparable(reports[0], other)
    combined: dict[str, Any] = {"rows": [], "sequences": {}}
    for report in reports:
        combined["rows"] += report.get("rows", [])
        combined["sequences"] |= report.get("sequences", {})
    return combined


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m editing.evaluation.margins REPORT.json ... --method NAME`: margins across reports of one evaluation."""
    parser = argparse.ArgumentParser(
        prog="python -m editing.evaluation.margins",
        description="A method's margin over every other row of one or more reports of the same evaluation "
        "(paired bootstrap over the edit batches, 95 %).",
    )
    parser.add_argument("reports", nargs="+", type=Path, help="<stem>.json files written by python -m editing.evaluate")
    parser.add_argument("--method", required=True, help="the row whose margins are wanted")
    parser.add_argument("--metric", action="append", help="metric (repeatable; default: average and clean_average)")
    args = parser.parse_args(argv)
    try:
        combined = combine([json.loads(path.read_text()) for path in args.reports])
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.method not in combined["sequences"]:
        print(f"error: no row {args.method!r} in these reports; rows: {', '.join(combined['sequences'])}", file=sys.stderr)
        return 2
    for metric in args.metric or ["average", "clean_average"]:
        for m in margins(combined, args.method, list(combined["sequences"]), metric):
            verdict = "clear" if m.clear else "within noise"
            print(f"{m.method} - {m.other} [{metric}]: {m.difference:+.1f} [{m.low:+.1f}, {m.high:+.1f}] {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
