"""The paired bootstrap behind the reports' margins section, and re-rendering a report from its JSON."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from editing.evaluation.margins import margins, paired_bootstrap
from editing.evaluation.report import main as report_main
from editing.evaluation.report import markdown


def test_a_constant_difference_has_a_zero_width_interval() -> None:
    a = [50.0, 60.0, 70.0, 40.0]
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    difference, low, high = paired_bootstrap([x + 2.5 for x in a], a)
    assert difference == pytest.approx(2.5) and low == pytest.approx(2.5) and high == pytest.approx(2.5)


def test_the_interval_has_the_width_of_the_mean_differences_spread() -> None:
    rng = random.Random(7)
    diffs = [rng.gauss(1.0, 4.0) for _ in range(64)]
    b = [rng.uniform(20, 80) for _ in diffs]
    a = [x + d for x, d in zip(b, diffs, strict=True)]
    difference, low, high = paired_bootstrap(a, b, samples=20_000)
    assert difference == pytest.approx(statistics.fmean(diffs))
    assert low < difference < high
    expected = 2 * 1.96 * statistics.pstdev(diffs) / math.sqrt(len(diffs))
    assert high - low == pytest.approx(expected, rel=0.15)
    # pairing matters: the per-batch levels (20-80) are shared and must not widen the interval
    assert high - low < 0.25 * statistics.pstdev(b)


def test_nan_pairs_are_left_out_and_bad_inputs_refused() -> None:
    difference, _, _ = paired_bootstrap([1.0, math.nan, 3.0], [0.0, 5.0, 1.0])
    assert difference == pytest.approx(1.5)
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no batch"):
        paired_bootstrap([math.nan], [1.0])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0], [1.0], level=1.0)


def _report(per_batch: dict[str, list[float]]) -> dict[str, Any]:
    rows = [
        {"method": label, "base_method": label, "train_limit": None, "average": statistics.fmean(values),
         "train_seconds_per_fact": 0.1, "edit_seconds_per_fact": 0.2, "train_facts": 992}
        for label, values in per_batch.items()
    ]
    sequences = {
        label: {"per_batch": [{"average": v, "clean_average": v} for v in values], "curve": []}
        for label, values in per_batch.items()
    }
    return {
        "data_kind": "zsre", "model": "m", "model_fingerprint": "f" * 16, "device": "cpu", "batches": 8,
        "batch_size": 4, "eval_data": "zsre:x", "seed": 0, "mode": "sequential", "train_data": "zsre:t",
        "rows": rows, "sequences": sequences,
    }


def test_markdown_says_which_leads_are_clear() -> None:
    base = [40.0, 55.0, 62.0, 48.0, 51.0, 70.0, 45.0, 58.0]
    report = _report({
        "ultraedit": [x + 8 for x in base],  # ahead of emsedit2 in every batch: not the reference
        "emsedit2": base,
        "ft": [x - 5 for x in base],  # behind in every batch: a clear lead
        "rledit": [x + (1 if i % 2 else -1) for i, x in enumerate(base)],  # a tie: within noise
    })
    found = {m.other: m for m in margins(report, "emsedit2", ["ultraedit", "ft", "rledit"])}
    assert found["ft"].clear and found["ft"].difference == pytest.approx(5.0)
    assert found["ultraedit"].clear and found["ultraedit"].difference == pytest.approx(-8.0)
    assert not found["rledit"].clear
    section = markdown(report).split("## Margins")[1]
    assert "`emsedit2` minus each other method" in section
    assert "| ft | +5.0 | [+5.0, +5.0] | clear |" in section
    assert "| rledit | +0.0 |" in section and "within noise" in section
    # without an emsedit2 row the best paper average is the reference
    del report["sequences"]["emsedit2"]
    report["rows"] = [r for r in report["rows"] if r["method"] != "emsedit2"]
    assert "`ultraedit` minus each other method" in markdown(report)


def test_rows_without_per_batch_values_are_left_out_of_the_margins() -> None:
    report = _report({"emsedit2": [50.0, 60.0], "ft": [40.0, 45.0]})
    report["rows"].append({**report["rows"][1], "method": "old"})  # a row from a report without sequences
    assert [m.other for m in margins(report, "emsedit2", ["ft", "old"])] == ["ft"]
    assert "| old |" not in markdown(report).split("## Margins")[1]


def test_report_cli_renders_again_and_names_the_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "editing_zsre.json"
    good.write_text(json.dumps(_report({"emsedit2": [50.0, 60.0, 55.0], "ft": [40.0, 45.0, 47.0]})))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code = report_main([str(broken), str(good), str(tmp_path / "missing.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{broken}: not a readable evaluation report" in err and "missing.json" in err
    # the good report between the two bad ones was still written
    assert "## Margins" in (tmp_path / "editing_zsre.md").read_text()
    assert (tmp_path / "editing_zsre.png").stat().st_size > 1000


def _one_row_report(method: str, values: list[float], **changes: Any) -> dict[str, Any]:
    base = {
        "model_fingerprint": "f1", "eval_data": "zsre:x", "eval_offset": 0, "eval_hash": "h", "data_kind": "zsre",
        "mode": "sequential", "batch_size": 4, "batches": len(values), "seed": 0, "unedited": {"average": 20.0},
        "rows": [{"method": method}], "sequences": {method: {"per_batch": [{"average": v} for v in values]}},
    }
    return base | changes


def test_margins_across_reports_of_one_evaluation_and_refusals_for_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from editing.evaluation.margins import main as margins_main

    old = tmp_path / "old.json"
    old.write_text(json.dumps(_one_row_report("paper", [50.0, 52.0, 48.0, 51.0])))
    # another transformers serialises the configuration differently: same weights, same unedited scores
    new = tmp_path / "new.json"
    new.write_text(json.dumps(_one_row_report("ours", [60.0, 63.0, 58.0, 62.0], model_fingerprint="f2")))
    assert margins_main([str(old), str(new), "--method", "ours", "--metric", "average"]) == 0
    out = capsys.readouterr().out
    assert "ours - paper [average]: +10.5" in out and "clear" in out

    other_facts = tmp_path / "other.json"
    other_facts.write_text(json.dumps(_one_row_report("ours", [60.0] * 4, eval_hash="other")))
    assert margins_main([str(old), str(other_facts), "--method", "ours"]) == 2
    assert "differ in eval_hash" in capsys.readouterr().err
    other_model = tmp_path / "model.json"
    other_model.write_text(json.dumps(_one_row_report("ours", [60.0] * 4, model_fingerprint="f3", unedited={"average": 21.0})))
    assert margins_main([str(old), str(other_model), "--method", "ours"]) == 2
    assert "different models" in capsys.readouterr().err
    assert margins_main([str(old), "--method", "missing"]) == 2
    assert "no row 'missing'" in capsys.readouterr().err
    assert margins_main([str(tmp_path / "absent.json"), "--method", "ours"]) == 2


def test_report_cli_merges_reports_of_one_evaluation_into_one_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = _report({"emsedit2": [50.0, 60.0, 55.0], "ft": [40.0, 45.0, 47.0]}) | {"unedited": {"average": 20.0}}
    target = tmp_path / "editing_zsre.json"
    target.write_text(json.dumps(full | {"commands": ["first run"]}))
    # a later run under another transformers: another fingerprint, the same unedited scores
    later = _report({"ours": [70.0, 72.0, 69.0]}) | {"unedited": {"average": 20.0}, "model_fingerprint": "e" * 16}
    later_path = tmp_path / "later.json"
    later_path.write_text(json.dumps(later | {"commands": ["second run"]}))
    before = target.read_text()

    other = _report({"x": [1.0, 2.0, 3.0]}) | {"unedited": {"average": 20.0}, "eval_hash": "other facts"}
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    assert report_main(["--into", str(target), str(later_path), str(other_path), "--reference", "ours"]) == 2
    err = capsys.readouterr().err
    assert f"{other_path}:" in err and "eval_hash" in err
    assert target.read_text() == before  # nothing written when one source does not merge

    assert report_main(["--into", str(target), str(later_path), "--reference", "nobody"]) == 2
    assert "'nobody' is not a row" in capsys.readouterr().err

    assert report_main(["--into", str(target), str(later_path), "--reference", "ours"]) == 0
    merged = json.loads(target.read_text())
    assert [r["method"] for r in merged["rows"]] == ["emsedit2", "ft", "ours"]
    assert merged["model_fingerprints"] == ["f" * 16, "e" * 16] and merged["reference"] == "ours"
    assert merged["device"] == "cpu"
    assert merged["commands"][:2] == ["first run", "second run"] and "--into" in merged["commands"][2]
    md = (tmp_path / "editing_zsre.md").read_text()
    assert "`ours` minus each other method" in md and "| emsedit2 | +" in md and "fingerprints ffffffffffff, eeeeeeeeeeee" in md
    # the reference survives a later merge that names none
    again = _report({"ft": [41.0, 44.0, 46.0]}) | {"unedited": {"average": 20.0}}
    (tmp_path / "again.json").write_text(json.dumps(again))
    assert report_main(["--into", str(target), str(tmp_path / "again.json")]) == 0
    assert json.loads(target.read_text())["reference"] == "ours"

    # other weights: other fingerprints and other unedited scores
    stranger = later | {"unedited": {"average": 21.0}}
    (tmp_path / "stranger.json").write_text(json.dumps(stranger))
    assert report_main(["--into", str(target), str(tmp_path / "stranger.json")]) == 2
    assert "different models" in capsys.readouterr().err
