"""The locality section of the evaluation report's Markdown (docs/locality.md).

`locality_lines(report, rows)` renders, for the rows of a report that carry the locality measures, one table
(each measure, the self-edit floor and the seconds spent), the zero edit's check and what the measures were
taken on. A report written before the measures existed gets no section.
"""

from __future__ import annotations

from typing import Any

from editing.evaluation.locality import UNEDITED

_LOCALITY_COLUMNS = [
    ("retention", "retention"), ("confident_retention", "confident retention"), ("mean_kl", "mean KL"),
    ("standing_kl", "standing KL"), ("known_fact_retention", "known facts"), ("probe_flip_rate", "probe flips"),
]
#: the values a correct measurement gives exactly after the zero edit: the unedited model's
_EXACT = {"retention": 100.0, **UNEDITED}


def _cell(value: Any) -> str:
    from editing.evaluation.report import cell  # here: report imports this module

    return cell(value)


def _self_edit(row: dict[str, Any], key: str) -> Any:
    return (row.get("null_edit") or {}).get("self", {}).get(key)


def _zero_edit_line(rows: list[dict[str, Any]]) -> list[str]:
    """The zero edit's measures and whether they are the unedited model's exactly (in every row that has them)."""
    found = [(row["method"], (row.get("null_edit") or {}).get("zero")) for row in rows]
    zeros: list[tuple[str, dict[str, Any]]] = [(method, zero) for method, zero in found if zero]
    if not zeros:
        return []
    wrong = [m for m, zero in zeros if any(zero.get(k) not in (None, v) for k, v in _EXACT.items())]
    values = ", ".join(f"{title} {_cell(zeros[0][1].get(key))}" for key, title in _LOCALITY_COLUMNS)
    verdict = f"NOT exact in {', '.join(wrong)}: the measurement is wrong" if wrong else "exact, as it must be"
    return [f"Zero edit (ΔW = 0 applied as an edit is, a check of the measurement itself): {values}; {verdict}."]


def _locality_notes(info: dict[str, Any]) -> list[str]:
    """What the whole-model measures were taken on (the report's `locality` section)."""
    if not info:
        return []
    known = (
        f"Known facts: {info['known_facts']} the unedited model gets right (every answer token top-1), found among "
        f"{info['known_facts_screened']} of {info['known_facts_candidates']} candidates from {info['known_facts_source']}."
    )
    probes = (
        f"Probes: {info['probe_items']} items of {', '.join(info['probe_tasks'])} from `{info['probe_data']}` "
        f"(unedited accuracy {_cell(info.get('probe_base_accuracy'))} %)."
        if info.get("probe_tasks") else ""
    )
    cost = (
        f"Measuring the unedited model for them took {_cell(info.get('reference_seconds'))} s, the zero edit "
        f"{_cell(info.get('zero_edit_seconds'))} s; each row's locality seconds (its measures and its self edit) are "
        "in the table."
    )
    notes = [f"Note: {n}." for n in info.get("notes", [])]
    return [" ".join(part for part in (known, probes, cost) if part), *notes]


def locality_lines(report: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The locality section: the measures of docs/locality.md per row, the self-edit floor and the zero edit."""
    if not any("confident_retention" in row or "mean_kl" in row for row in rows):
        return []  # a report written before these were measured
    columns = _LOCALITY_COLUMNS + ([("neighbourhood_score", "neighbourhood")] if report["data_kind"] == "counterfact" else [])
    head = ["method", *[title for _, title in columns], "self edit: retention", "self edit: mean KL", "locality s"]
    lines = [
        "",
        "## Locality",
        "",
        "Against the unedited model, on the final model (docs/locality.md in the repository). Confident "
        f"retention counts only the answer positions where the unedited model's top-1 probability is at least "
        f"{_cell(report.get('locality', {}).get('confidence_threshold', 0.5))}; mean KL is KL(unedited ‖ edited) in "
        "nats over the locality prompts' answer positions, standing KL over the next token of the standing prompts; "
        "known facts is the share of facts outside the stream the unedited model gets right that are still right; "
        "probe flips the share of GLUE-style probe predictions that changed"
        + ("; neighbourhood is P(true) > P(new) on the neighbourhood prompts, token-wise (LS)"
           if report["data_kind"] == "counterfact" else "")
        + ". Self edit: retention and mean KL after the method edited the first batch towards the unedited model's "
        "own answers, which should change nothing (its noise floor).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    unedited = report.get("unedited") or {}
    lines.append("| unedited model | " + " | ".join(_cell(unedited.get(key)) for key, _ in columns) + " | - | - | - |")
    for row in rows:
        cells = [row["method"], *[_cell(row.get(key)) for key, _ in columns]]
        cells += [_cell(_self_edit(row, "retention")), _cell(_self_edit(row, "mean_kl")), _cell(row.get("locality_seconds"))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = _zero_edit_line(rows) + _locality_notes(report.get("locality") or {})
    return lines + (["", *notes] if notes else [])
