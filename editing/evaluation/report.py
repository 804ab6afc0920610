"""The evaluation report: one JSON document, a Markdown table and a plot, written side by side.

The JSON holds the run's settings (`model`, `train_data`, `eval_data`, `batch_size`, `batches`, ...), the
commands that produced it, the unedited model's scores, and `rows` (one per method and training-set size:
`method`, `efficacy`, `generalization`, `specificity`, `retention`, `average`, `train_seconds_per_fact`,
`edit_seconds_per_fact`, and more), plus `sequences`: each row's metrics per edited batch on the final
model and, when measured, the curve over the edit sequence. Metrics are percentages, KL in nats.

The locality measures (docs/locality.md) are top-level row fields too: `confident_retention`, `mean_kl`,
`standing_kl`, `known_fact_retention`, `probe_flip_rate` (null when not measurable) and, on CounterFact,
`neighbourhood_score`; `null_edit` holds the measures after the zero edit and after the method's self edit,
`daemon_default` is true on the row of the daemon's default editor, and the report's `locality` section says
what was measured. Reports written before these existed still render: a missing field is shown as "-".

`merge` adds the rows of a new run to an existing report of the same evaluation (same model, facts, order,
mode and batch shape), replacing rows of the same name, so that one table can be built from several runs.
`python -m editing.evaluation.report --into TARGET.json REPORT.json ...` does the same with reports already
written, and writes the target's Markdown and plot again.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from editing.evaluation.harness import StreamResult
from editing.evaluation.locality import LOCALITY_METRICS, NATS
from editing.evaluation.locality_section import locality_lines
from editing.evaluation.margins import margins
from editing.evaluation.methods import PreparedMethod

#: the settings two runs must share for their rows to go into one table
COMPARABLE = ("model_fingerprint", "eval_data", "eval_offset", "eval_hash", "data_kind", "mode", "batch_size", "batches", "seed")

_COLUMNS_ZSRE = [
    ("efficacy", "ES"), ("generalization", "GS"), ("specificity", "LS"), ("average", "avg (paper)"),
    ("retention", "retention"), ("clean_average", "avg (clean)"),
]
_COLUMNS_CF = [
    ("efficacy", "ES"), ("generalization", "GS"), ("specificity", "LS"), ("average", "avg (paper)"),
    ("efficacy_sequence", "ES seq"), ("generalization_sequence", "GS seq"), ("specificity_sequence", "LS seq"),
    ("retention", "retention"), ("clean_average", "avg (clean)"),
]


def _rounded(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else round(v, 5 if k in NATS else 2)) for k, v in metrics.items()}


def make_row(
    label: str, method: PreparedMethod, result: StreamResult, *, train_data: str | None, train_limit: int | None,
    load_average: tuple[float, float, float], daemon_default: bool = False, zero_edit: dict[str, float] | None = None,
    locality: bool = False,
) -> dict[str, Any]:
    """One table row: the final metrics, the seconds per fact and how the method was prepared.

    With `locality` (the locality measures were taken) every locality field is present, null where it could
    not be measured, with the null edits (`zero_edit`, the run's, and the row's self edit) under `null_edit`.
    """
    train_per_fact = method.train_seconds / method.train_facts if method.train_facts else 0.0
    edit_per_fact = result.edit_seconds / result.edited_facts if result.edited_facts else math.nan
    measured: dict[str, Any] = {}
    if locality:
        measured = {name: None for name in LOCALITY_METRICS if name not in result.final}
        measured["null_edit"] = {"zero": _rounded(zero_edit or {}), "self": _rounded(result.null_edit)}
        measured["locality_seconds"] = round(result.locality_seconds, 1)
    return {
        "method": label,
        "base_method": method.spec.name,
        "description": method.spec.description,
        "daemon_default": daemon_default,
        **_rounded(result.final),
        **measured,
        "train_seconds_per_fact": round(train_per_fact, 4),
        "edit_seconds_per_fact": round(edit_per_fact, 4),
        "train_facts": method.train_facts,
        "train_data": train_data if method.train_facts else None,
        "train_limit": train_limit if method.train_facts else None,
        "train_seconds": round(method.train_seconds, 2),
        "train_cpu_seconds": round(method.train_cpu_seconds, 2),
        "edit_seconds": round(result.edit_seconds, 2),
        "edit_cpu_seconds": round(result.edit_cpu_seconds, 2),
        "edited_facts": result.edited_facts,
        "editor": method.source,
        "settings": method.spec.settings(),
        "load_average": [round(x, 2) for x in load_average],
    }


def make_sequence(result: StreamResult) -> dict[str, Any]:
    return {
        "per_batch": [_rounded(m) for m in result.per_batch],
        "curve": [{"batches": k, **_rounded(m)} for k, m in result.curve],
    }


def fingerprints(report: dict[str, Any]) -> list[str]:
    """Every model fingerprint a report's rows were measured under (more than one after a cross-version merge)."""
    return list(dict.fromkeys([*report.get("model_fingerprints", []), report["model_fingerprint"]]))


def check_comparable(first: dict[str, Any], other: dict[str, Any]) -> None:
    """ValueError unless two reports measured the same evaluation, so that their rows belong in one table.

    They must agree on every key of `COMPARABLE` (facts, order, mode, shape, seed) except possibly the model
    fingerprint. Reports written before editor 0.2 carry a fingerprint that also covered the model's
    configuration as the installed transformers serialised it, which changes between transformers releases
    for the same weights, and 0.2's weights-only fingerprint differs from both; a differing fingerprint is
    therefore accepted when the unedited model scored exactly the same on every metric both reports have
    for these facts (all scores are computed from the weights' outputs, so other weights would not agree to the
    last digit on hundreds of prompts).
    """
    differing = [key for key in COMPARABLE if key != "model_fingerprint" and first.get(key) != other.get(key)]
    if differing:
        raise ValueError(f"the reports measured different evaluations: they differ in {', '.join(differing)}")
    if first.get("model_fingerprint") != other.get("model_fingerprint") and not _same_unedited(
        first.get("unedited") or {}, other.get("unedited") or {}
    ):
        raise ValueError(
            "the reports were made on different models: other fingerprints "
            f"({str(first.get('model_fingerprint'))[:12]}, {str(other.get('model_fingerprint'))[:12]}) "
            "and other unedited scores"
        )


def _same_unedited(first: dict[str, Any], other: dict[str, Any]) -> bool:
    """The unedited model scored the same on every metric both reports have (a report written before the
    locality measures lacks them)."""
    shared = first.keys() & other.keys()
    return bool(shared) and all(first[key] == other[key] for key in shared)


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with `new`'s rows added (same-named rows replaced) and its commands appended.

    ValueError when the two runs measured different things (see `check_comparable`). The merged report keeps
    the newer run's settings; `model_fingerprints` lists every fingerprint its rows were measured under, and
    the margins' `reference` row is the newer report's when it names one, else the older's.
    """
    try:
        check_comparable(old, new)
    except ValueError as exc:
        raise ValueError(
            f"cannot merge into the existing report: {exc}; write to another --output directory or --stem, "
            "or drop --merge"
        ) from exc
    labels = {row["method"] for row in new["rows"]}
    merged = dict(new)
    merged["model_fingerprints"] = list(dict.fromkeys([*fingerprints(old), *fingerprints(new)]))
    if len(merged["model_fingerprints"]) == 1:
        del merged["model_fingerprints"]
    if old.get("device") and new.get("device"):
        # per-run devices are in `runs`; the header names every one the rows were measured on
        merged["device"] = "; ".join(dict.fromkeys([*str(old["device"]).split("; "), str(new["device"])]))
    if new.get("reference") or old.get("reference"):
        merged["reference"] = new.get("reference") or old.get("reference")
    merged["rows"] = [row for row in old["rows"] if row["method"] not in labels] + new["rows"]
    merged["sequences"] = {k: v for k, v in old.get("sequences", {}).items() if k not in labels} | new.get("sequences", {})
    merged["commands"] = old.get("commands", []) + [c for c in new.get("commands", []) if c not in old.get("commands", [])]
    merged["runs"] = old.get("runs", []) + new.get("runs", [])
    merged["train_data"] = train_data_of(merged["rows"])
    return merged


def train_data_of(rows: list[dict[str, Any]]) -> str | list[str] | None:
    """The training data of the rows that were trained: one spec, or the distinct specs in row order."""
    specs = list(dict.fromkeys(row["train_data"] for row in rows if row.get("train_data")))
    return specs[0] if len(specs) == 1 else (specs or None)


def cell(value: Any) -> str:
    """A Markdown table cell: "-" for a missing value, one decimal, three significant digits below 1."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], unedited: dict[str, Any] | None) -> list[str]:
    head = ["method", *[title for _, title in columns], "train s/fact", "edit s/fact", "train facts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if unedited:
        lines.append("| unedited model | " + " | ".join(cell(unedited.get(key)) for key, _ in columns) + " | - | - | - |")
    for row in rows:
        cells = [row["method"], *[cell(row.get(key)) for key, _ in columns]]
        cells += [cell(row["train_seconds_per_fact"]), cell(row["edit_seconds_per_fact"]), str(row["train_facts"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _signed(value: float) -> str:
    return f"{value:+.1f}"


def _margin_lines(report: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The margins section: the report's `reference` row, or else EMSEdit (S = 2), or else the best paper
    average, against every other row."""
    labels = [r["method"] for r in rows]
    if len(labels) < 2:
        return []
    best = max(rows, key=lambda r: -math.inf if r.get("average") is None else r["average"])["method"]
    candidates = [str(m) for m in (report.get("reference"), "emsedit2") if m in labels]
    reference = candidates[0] if candidates else str(best)
    by_metric = {metric: {m.other: m for m in margins(report, reference, labels, metric)} for metric in ("average", "clean_average")}
    others = [label for label in labels if label in by_metric["average"]]
    if not others:
        return []
    n = by_metric["average"][others[0]].batches
    lines = [
        "",
        "## Margins",
        "",
        f"`{reference}` minus each other method, in points, with a 95 % paired bootstrap interval over the {n} edit "
        "batches (10,000 resamples, `editing/evaluation/margins.py`). *clear*: the interval excludes 0. The "
        "interval covers the choice of facts only, not retraining the editors or another seed.",
        "",
        "| against | avg (paper) | 95 % interval | | avg (clean) | 95 % interval | |",
        "|---|---|---|---|---|---|---|",
    ]
    for other in others:
        cells = [other]
        for metric in ("average", "clean_average"):
            m = by_metric[metric].get(other)
            cells += (
                [_signed(m.difference), f"[{_signed(m.low)}, {_signed(m.high)}]", "clear" if m.clear else "within noise"]
                if m
                else ["-", "-", ""]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _default_text(rows: list[dict[str, Any]]) -> str:
    defaults = [row["method"] for row in rows if row.get("daemon_default")]
    return f" `{defaults[0]}` is the daemon's default editor (`daemon_default` in the JSON)." if defaults else ""


def _train_text(train_data: str | list[str] | None) -> str:
    if not train_data:
        return "none (training-free methods only)"
    return ", ".join(f"`{spec}`" for spec in ([train_data] if isinstance(train_data, str) else train_data))


def _fingerprint_text(report: dict[str, Any]) -> str:
    prints = fingerprints(report)
    if len(prints) == 1:
        return f"fingerprint {prints[0][:12]}"
    return (
        f"fingerprints {', '.join(p[:12] for p in prints)}: the same weights fingerprinted under other "
        "transformers releases or fingerprint versions; the unedited scores agree exactly"
    )


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: settings, commands, the main table and the data-efficiency table."""
    columns = _COLUMNS_CF if report["data_kind"] == "counterfact" else _COLUMNS_ZSRE
    # rows trained on the first K facts go into their own table when the same method also has a full row
    full = {r["base_method"] for r in report["rows"] if r.get("train_limit") is None}
    limited = sorted(
        (r for r in report["rows"] if r.get("train_limit") is not None and r["base_method"] in full),
        key=lambda r: (r["base_method"], r["train_limit"]),
    )
    main = [r for r in report["rows"] if r not in limited]
    lines = [
        f"# Editing evaluation: {report['data_kind']}",
        "",
        f"Model `{report['model']}` ({_fingerprint_text(report)}), device {report['device']}. "
        f"Evaluation facts: {report['batches']} batches of {report['batch_size']} from `{report['eval_data']}` "
        + (f"after its first {report['eval_offset']} facts " if report.get("eval_offset") else "")
        + f"(seed {report['seed']}), {report['mode']} editing; "
        + ("every metric is measured on the final model after all batches." if report["mode"] == "sequential"
           else "each batch is edited on the unedited model and measured alone."),
        f"Training facts: {_train_text(report.get('train_data'))}; the number each method used is in the table."
        + _default_text(report["rows"]),
        "Metrics ×100. ES/GS/LS are the paper's (spec §8); avg (paper) is their mean. Retention is the top-1 "
        "agreement with the unedited model on the locality prompts; avg (clean) is the mean of ES, GS and retention"
        + (" with the whole-answer (ROME-style, 'seq') ES and GS." if report["data_kind"] == "counterfact" else "."),
        "Seconds are wall-clock per fact; see the JSON for CPU seconds and load averages.",
        "",
        *_table(main, columns, report.get("unedited")),
    ]
    lines += _margin_lines(report, main)
    lines += locality_lines(report, main)
    if limited:
        lines += ["", "## Data efficiency (training on the first K facts only)", "", *_table(limited, columns, None)]
    lines += ["", "## Commands", "", *[f"    {c}" for c in report.get("commands", [])]]
    runs = report.get("runs", [])
    if runs:
        lines += ["", "## Runs", ""]
        lines += [
            f"- {r['started']}: {r['wall_seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU, load average "
            f"{r['load_average_start']} → {r['load_average_end']}, {r['device']}; rows: {', '.join(r.get('methods', []))}"
            for r in runs
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Metrics over the edit sequence, one line per method (rows trained on all facts, when there are any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["method"] for r in report["rows"] if r.get("train_limit") is None]
    labels = labels or [r["method"] for r in report["rows"]]
    sequences = report.get("sequences", {})
    metrics = ["efficacy", "generalization", "retention", "specificity"]
    if any("mean_kl" in m for seq in sequences.values() for m in seq.get("per_batch", [])):
        metrics.append("mean_kl")  # nats, not %: how far the final model moved on each batch's locality prompts
    with_curve = any(sequences.get(label, {}).get("curve") for label in labels)
    n_rows = 2 if with_curve else 1
    fig, axes = plt.subplots(n_rows, len(metrics), figsize=(4.2 * len(metrics) + 2.2, 3.6 * n_rows), squeeze=False)
    # One colour per method in every panel (tab20 has enough for the full comparison), and the reference row
    # drawn thick: with a dozen methods the eye otherwise cannot follow one line from panel to panel.
    tab20 = plt.get_cmap("tab20")
    palette = [tab20(i) for i in range(20)]
    reference = report.get("reference")
    for index, label in enumerate(labels):
        seq = sequences.get(label, {})
        style = {"label": label, "color": palette[index % len(palette)]}
        if label == reference:
            style.update(linewidth=2.6, zorder=5, color="black")
        for j, metric in enumerate(metrics):
            values = [m.get(metric) for m in seq.get("per_batch", [])]
            axes[0][j].plot(range(1, len(values) + 1), [math.nan if v is None else v for v in values], **style)
            if with_curve and seq.get("curve"):
                xs = [c["batches"] for c in seq["curve"]]
                ys = [math.nan if c.get(metric) is None else c[metric] for c in seq["curve"]]
                axes[1][j].plot(xs, ys, marker="o", markersize=3, **style)
    for j, metric in enumerate(metrics):
        axes[0][j].set_title(f"{metric}, final model, by batch")
        axes[0][j].set_xlabel("position of the batch in the edit sequence")
        if with_curve:
            axes[1][j].set_title(f"{metric} of all facts edited so far")
            axes[1][j].set_xlabel("batches edited")
    axes[0][0].set_ylabel("%")
    if labels:
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, fontsize=8, loc="center right")
    fig.suptitle(f"{report['data_kind']}: {report['batches']}×{report['batch_size']} {report['mode']} edits, {report['model']}")
    fig.tight_layout(rect=(0.0, 0.0, 1.0 - 2.0 / (4.2 * len(metrics) + 2.2), 1.0))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    # A 256-colour palette keeps the committed plots at a third of the size (a dozen lines plus
    # antialiasing fit in it without visible change).
    from PIL import Image

    buffer.seek(0)
    with Image.open(buffer) as image:
        reduced = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        reduced.save(path, format="PNG", optimize=True)


def render(path: Path) -> list[Path]:
    """Write the Markdown and the plot of an existing JSON report again, next to it (after a code change)."""
    report = json.loads(path.read_text())
    return write(report, path.parent, path.stem)


def write(report: dict[str, Any], directory: Path, stem: str) -> list[Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` into `directory` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths


def combine_into(target: Path, sources: Sequence[Path], reference: str | None, command: str) -> list[Path]:
    """Merge the rows of `sources` (in order) into the report `target`, record `command`, and write it again.

    ValueError (naming the file) when a source measured another evaluation; OSError when a file is missing.
    Nothing is written unless every source merges.
    """
    report = _read(target)
    for source in sources:
        try:
            report = merge(report, _read(source))
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from exc
    if reference is not None:
        if reference not in {row["method"] for row in report["rows"]}:
            raise ValueError(f"--reference {reference!r} is not a row of the merged report")
        report["reference"] = reference
    if command not in report.get("commands", []):
        report["commands"] = [*report.get("commands", []), command]
    return write(report, target.parent, target.stem)


def _read(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list) or "model_fingerprint" not in report:
        raise ValueError(f"{path}: not an evaluation report (no rows or no model_fingerprint)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m editing.evaluation.report REPORT.json ...`: render each report's Markdown and plot again;
    with `--into TARGET.json`, merge the reports' rows into TARGET first (one table from several runs)."""
    parser = argparse.ArgumentParser(
        prog="python -m editing.evaluation.report",
        description="Write the Markdown and the plot of evaluation reports again from their JSON, or merge "
        "reports of one evaluation into one.",
    )
    parser.add_argument("reports", nargs="+", type=Path, help="<stem>.json files written by python -m editing.evaluate")
    parser.add_argument("--into", type=Path, default=None, help="merge the reports' rows into this report")
    parser.add_argument("--reference", default=None, help="the row whose margins over the others the Markdown shows")
    args = parser.parse_args(argv)
    if args.into is not None or args.reference is not None:
        target = args.into if args.into is not None else args.reports[0]
        sources = args.reports if args.into is not None else args.reports[1:]
        command = "python -m editing.evaluation.report " + " ".join(sys.argv[1:] if argv is None else argv)
        try:
            written = combine_into(target, sources, args.reference, command)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(" ".join(str(p) for p in written))
        return 0
    status = 0
    for path in args.reports:
        try:
            written = render(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a missing file, bad JSON, not a report
            kind = "missing field" if isinstance(exc, KeyError) else type(exc).__name__
            print(f"error: {path}: not a readable evaluation report ({kind}: {exc})", file=sys.stderr)
            status = 2
            continue
        print(" ".join(str(p) for p in written[1:]))
    return status


if __name__ == "__main__":
    sys.exit(main())
