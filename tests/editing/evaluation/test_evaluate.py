"""The evaluation harness and `python -m editing.evaluate` on tiny models: every method end to end, metrics on
the final model, the reports, training-set limits, checkpoints and clear errors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from editing.data import EditExample
from editing.engine.deltas import EditPlan
from editing.engine.synthetic import synthetic_examples
from editing.evaluate import main
from editing.evaluation.harness import measure_baseline, run_stream
from editing.evaluation.methods import METHODS, ModelHandle, PreparedMethod, get_method, parse_variant
from editing.evaluation.report import merge
from editing.evaluation.runner import EvaluationPlan, run_evaluation
from editing.model.loading import model_fingerprint
from editing.model.targets import resolve_modules, weight_in_out

ROW_FIELDS = {
    "method", "efficacy", "generalization", "specificity", "retention", "average",
    "train_seconds_per_fact", "edit_seconds_per_fact",
}


def _handle(engine_tiny_lm: Any, tokenizer: Any) -> tuple[ModelHandle, list[str]]:
    model, names = engine_tiny_lm("llama", seed=0)
    return ModelHandle(model, tokenizer, model_fingerprint(model), "llama"), names


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_every_method_runs_end_to_end_and_leaves_the_model(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    handle, names = _handle(engine_tiny_lm, bpe_tokenizer)
    before = _params(handle.model)
    plan = EvaluationPlan(
        methods=list(METHODS.values()), eval_data="synthetic:8", train_data="synthetic:40", batch_size=4, batches=2,
    )
    report = run_evaluation(plan, handle, names)
    assert [row["method"] for row in report["rows"]] == list(METHODS)
    for row in report["rows"]:
        assert set(row) >= ROW_FIELDS, row["method"]
        assert 0 <= row["efficacy"] <= 100 and 0 <= row["retention"] <= 100, row
        assert row["edited_facts"] == 8
        trains = METHODS[row["method"]].training is not None
        assert row["train_facts"] == (32 if trains else 0), row["method"]  # whole batches of 16 only
    assert len(report["sequences"]["emsedit2"]["per_batch"]) == 2
    assert all(torch.equal(p, before[n]) for n, p in handle.model.named_parameters()), "the model is restored"


class _Scripted:
    """A stub editor: no change for every batch but the last, which wipes one edited weight."""

    def __init__(self, model: torch.nn.Module, name: str, n_batches: int) -> None:
        self.weight = weight_in_out(resolve_modules(model, [name])[name])
        self.name, self.calls, self.n_batches = name, 0, n_batches

    def propose(self, examples: Sequence[EditExample], masters: dict[str, torch.Tensor] | None = None) -> EditPlan:
        self.calls += 1
        base = masters[self.name] if masters else self.weight.float()
        wipe = self.calls % self.n_batches == 0
        return EditPlan({self.name: -base.clone() * 50 if wipe else torch.zeros_like(base)})


@pytest.mark.parametrize("mode", ["sequential", "batch"])
def test_sequential_metrics_are_measured_on_the_final_model(
    mode: str, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    handle, names = _handle(engine_tiny_lm, bpe_tokenizer)
    facts = synthetic_examples(12, seed=3)
    batches = [facts[0:4], facts[4:8], facts[8:12]]
    baseline = measure_baseline(handle.model, bpe_tokenizer, batches, "zsre")
    before = _params(handle.model)
    method = PreparedMethod(get_method("ft"), _Scripted(handle.model, names[1], 3), names)
    result = run_stream(method, handle.model, bpe_tokenizer, batches, baseline, "zsre", mode=mode)  # type: ignore[arg-type]
    first, last = result.per_batch[0]["retention"], result.per_batch[-1]["retention"]
    if mode == "sequential":
        # batch 1 was harmless when it was edited; the final model (after batch 3 wiped a weight) is what counts
        assert first < 100 and last < 100
    else:
        assert first == 100 and last < 100  # each batch alone, the model restored in between
    assert all(torch.equal(p, before[n]) for n, p in handle.model.named_parameters())


def test_a_routed_method_leaves_prompts_without_a_mention_on_the_unedited_model(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    from editing.engine.key_covariance import reference_texts
    from editing.engine.mentions import MentionSettings, build_router

    handle, names = _handle(engine_tiny_lm, bpe_tokenizer)
    facts = synthetic_examples(12, seed=3)
    batches = [facts[0:4], facts[4:8], facts[8:12]]
    baseline = measure_baseline(handle.model, bpe_tokenizer, batches, "zsre")
    before = _params(handle.model)
    # only the last block is edited, so the decision block (its input) sees context; a strict threshold: only a
    # token whose state is a stored key's own (the same prefix up to the subject) routes on
    edited = names[1:]
    settings = MentionSettings(threshold=0.999, blocks_before=0)
    router = build_router(handle.model, bpe_tokenizer, edited, reference_texts(synthetic_examples(20, seed=9)), settings)
    assert router.config.block == "model.layers.1"
    results = {}
    for label, routing in (("plain", None), ("routed", router)):
        method = PreparedMethod(get_method("ft"), _Scripted(handle.model, names[1], 3), edited, router=routing)
        results[label] = run_stream(method, handle.model, bpe_tokenizer, batches, baseline, "zsre").final  # type: ignore[arg-type]
    # the wiped weight reaches every prompt unrouted; routed, only the edit prompts themselves (their own keys)
    assert results["plain"]["retention"] < 100 and results["routed"]["retention"] == 100
    # the edit prompts route on from their subject, so their answers are exactly the edited model's
    assert results["routed"]["efficacy"] == results["plain"]["efficacy"]
    assert router.keys.count() == 0, "the stream's keys are removed when it ends"
    assert all(torch.equal(p, before[n]) for n, p in handle.model.named_parameters())


def test_curve_measures_everything_edited_so_far(engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None) -> None:
    handle, names = _handle(engine_tiny_lm, bpe_tokenizer)
    facts = synthetic_examples(12, seed=3)
    batches = [facts[0:4], facts[4:8], facts[8:12]]
    baseline = measure_baseline(handle.model, bpe_tokenizer, batches, "zsre")
    method = PreparedMethod(get_method("ft"), _Scripted(handle.model, names[1], 3), names)
    result = run_stream(method, handle.model, bpe_tokenizer, batches, baseline, "zsre", curve_every=1)  # type: ignore[arg-type]
    assert [k for k, _ in result.curve] == [1, 2, 3]
    assert result.curve[0][1]["retention"] == 100 and result.curve[-1][1] == result.final


def test_counterfact_rows_carry_the_paper_and_the_whole_answer_metrics(
    tmp_path: Path, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    path = _counterfact_file(tmp_path, 8)
    handle, names = _handle(engine_tiny_lm, bpe_tokenizer)
    plan = EvaluationPlan(methods=[get_method("ultraedit")], eval_data=f"counterfact:{path}", batch_size=4, batches=2)
    report = run_evaluation(plan, handle, names)
    row = report["rows"][0]
    assert report["data_kind"] == "counterfact"
    for key in ("efficacy_sequence", "generalization_sequence", "specificity_sequence", "clean_average"):
        assert key in row and key in report["unedited"]


def _counterfact_file(tmp_path: Path, n: int) -> Path:
    records = [
        {
            "prompt": e.prompt, "subject": e.subject, "target_new": e.target_new, "ground_truth": e.target_true,
            "rephrase_prompt": e.rephrase_prompts[0], "locality_prompt": e.locality[0][0],
            "locality_ground_truth": e.locality[0][1],
        }
        for e in synthetic_examples(n, seed=2)
    ]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    return path


def _zsre_file(tmp_path: Path, n: int, name: str) -> Path:
    records = [
        {"src": e.prompt, "alt": e.target_new, "answers": [e.target_true], "rephrase": e.rephrase_prompts[0],
         "loc": "nq question: " + e.locality[0][0], "loc_ans": e.locality[0][1], "subject": e.subject}
        for e in synthetic_examples(n, seed=len(name))
    ]
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def tiny_model_dir(tmp_path: Path, engine_tiny_lm: Any, bpe_tokenizer: Any) -> tuple[Path, list[str]]:
    model, names = engine_tiny_lm("llama", seed=0)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    return folder, names


def _cli(model_dir: tuple[Path, list[str]], *extra: str) -> list[str]:
    folder, names = model_dir
    # no probes unless a test asks: the shared GLUE texts are long for a tiny model's byte-level tokenizer
    return ["--model", str(folder), "--device", "cpu", "--modules", ",".join(names), "--no-progress", "--threads", "1",
            "--probe-limit", "0", *extra]


def test_cli_writes_json_markdown_and_plot_and_respects_train_limit(
    tmp_path: Path, tiny_model_dir: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    train, dev = _zsre_file(tmp_path, 48, "train.json"), _zsre_file(tmp_path, 12, "dev.json")
    out = tmp_path / "out"
    code = main(_cli(
        tiny_model_dir, "--methods", "emsedit2,ultraedit", "--train-data", f"zsre:{train}", "--data", f"zsre:{dev}",
        "--batch-size", "4", "--batches", "3", "--train-limit", "16", "--output", str(out), "--curve",
        "--editors-dir", str(tmp_path / "editors"),
    ))
    assert code == 0
    report = json.loads((out / "editing_zsre.json").read_text())
    assert {"model", "train_data", "eval_data", "batch_size", "batches", "rows"} <= set(report)
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"emsedit2@K16", "ultraedit"}
    assert rows["emsedit2@K16"]["train_facts"] == 16 and rows["emsedit2@K16"]["train_limit"] == 16
    assert len(report["sequences"]["ultraedit"]["curve"]) == 3
    assert (out / "editing_zsre.png").stat().st_size > 1000
    with Image.open(out / "editing_zsre.png") as plot_image:  # palette PNG: committed plots stay small
        assert plot_image.mode == "P" and plot_image.width > 1000
    markdown = (out / "editing_zsre.md").read_text()
    assert "| ultraedit |" in markdown and "| emsedit2@K16 |" in markdown and "Data efficiency" not in markdown
    assert "| ultraedit |" in capsys.readouterr().out
    # the trained editor was saved; a second run reuses it, and --merge adds rows to the same report
    assert len(list((tmp_path / "editors").iterdir())) == 1
    code = main(_cli(
        tiny_model_dir, "--method", "emsedit2", "--train-data", f"zsre:{train}", "--data", f"zsre:{dev}",
        "--batch-size", "4", "--batches", "3", "--train-limit", "16", "--output", str(out), "--merge",
        "--editors-dir", str(tmp_path / "editors"),
    ))
    assert code == 0
    merged = json.loads((out / "editing_zsre.json").read_text())
    assert [r["method"] for r in merged["rows"]] == ["ultraedit", "emsedit2@K16"]
    assert merged["rows"][1]["editor"].startswith("reused") and len(merged["runs"]) == 2
    assert merged["runs"][0]["versions"]["transformers"] == metadata.version("transformers")


def test_cli_locality_options_reach_the_report(tmp_path: Path, tiny_model_dir: tuple[Path, list[str]]) -> None:
    dev, pool = _zsre_file(tmp_path, 8, "dev.json"), _zsre_file(tmp_path, 12, "pool.json")
    probes = tmp_path / "probes"
    probes.mkdir()
    for task in ("sst2", "cola"):
        (probes / f"{task}.json").write_text(json.dumps([{"sentence": f"Who sang {i}?", "label": i % 2} for i in range(4)]))
    common = ["--method", "ultraedit", "--data", f"zsre:{dev}", "--batch-size", "4", "--batches", "2"]
    # a probe directory without every default task is skipped with a note, not an error
    assert main(_cli(tiny_model_dir, *common, "--output", str(tmp_path / "a"), "--known-facts", "5",
                     "--known-facts-data", f"zsre:{pool}", "--probe-data", str(probes), "--probe-limit", "2")) == 0
    report = json.loads((tmp_path / "a" / "editing_zsre.json").read_text())
    assert report["locality"]["known_facts_source"] == f"zsre:{pool}" and report["locality"]["probe_items"] == 0
    assert any("probes not measured" in note for note in report["locality"]["notes"])
    row = report["rows"][0]
    assert row["probe_flip_rate"] is None and isinstance(row["mean_kl"], float) and "zero" in row["null_edit"]
    assert main(_cli(tiny_model_dir, *common, "--output", str(tmp_path / "b"), "--no-locality")) == 0
    plain = json.loads((tmp_path / "b" / "editing_zsre.json").read_text())
    assert "locality" not in plain and "mean_kl" not in plain["rows"][0] and plain["rows"][0]["daemon_default"] is False


def test_cli_loads_a_checkpoint(tmp_path: Path, tiny_model_dir: tuple[Path, list[str]]) -> None:
    train, dev = _zsre_file(tmp_path, 32, "train.json"), _zsre_file(tmp_path, 8, "dev.json")
    editors = tmp_path / "editors"
    common = ["--data", f"zsre:{dev}", "--batch-size", "4", "--batches", "2", "--output", str(tmp_path / "out")]
    assert main(_cli(tiny_model_dir, "--method", "malmen", "--train-data", f"zsre:{train}", "--editors-dir", str(editors), *common)) == 0
    saved = next(editors.iterdir())
    assert main(_cli(tiny_model_dir, "--method", "malmen", "--checkpoint", str(saved), "--stem", "ckpt", *common)) == 0
    row = json.loads((tmp_path / "out" / "ckpt.json").read_text())["rows"][0]
    first = json.loads((tmp_path / "out" / "editing_zsre.json").read_text())["rows"][0]
    assert row["editor"].startswith("checkpoint") and row["train_facts"] == 32
    assert row["efficacy"] == first["efficacy"] and row["retention"] == first["retention"]


@pytest.mark.parametrize(
    ("data", "message"),
    [("zsre", "zsre:PATH"), ("parquet:/x.parquet", "zsre:PATH"), ("zsre:/no/such/file.json", "does not exist")],
)
def test_cli_rejects_a_bad_data_spec_clearly(
    data: str, message: str, tiny_model_dir: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_cli(tiny_model_dir, "--method", "ft", "--data", data)) == 2
    assert message in capsys.readouterr().err


def test_cli_needs_training_data_for_methods_that_learn(
    tmp_path: Path, tiny_model_dir: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    dev = _zsre_file(tmp_path, 8, "dev.json")
    code = main(_cli(tiny_model_dir, "--method", "malmen", "--data", f"zsre:{dev}", "--batch-size", "4", "--batches", "2"))
    assert code == 1 and "--train-data" in capsys.readouterr().err


def test_variants_change_only_the_named_settings() -> None:
    spec = parse_variant("ems_kl=emsedit2:locality=kl,loc_coef=0.5,preserve_keys=10,single_adam_step=false")
    assert spec.name == "ems_kl" and spec.editor.steps == 2 and spec.editor.preserve_keys == 10
    assert spec.training is not None and spec.training.locality == "kl" and spec.training.loc_coef == 0.5
    assert spec.training.single_adam_step is False and spec.training.l2_coef == 0.5
    assert parse_variant("ft_fast=ft:lr=0.01").ft.lr == 0.01  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="no setting"):
        parse_variant("bad=ultraedit:meta_lr=1")
    with pytest.raises(ValueError, match="unknown method"):
        get_method("rome")
    with pytest.raises(ValueError, match=r"variant 'm=emsedit2:steps=3,preserve_edits': 'preserve_edits' is not field=value"):
        parse_variant("m=emsedit2:steps=3,preserve_edits")
    with pytest.raises(ValueError, match="is not LABEL=BASE"):
        parse_variant("emsedit2")


def test_merge_refuses_a_different_evaluation() -> None:
    old = {"model_fingerprint": "a", "eval_hash": "x", "rows": [{"method": "ft"}], "commands": ["one"]}
    new = {"model_fingerprint": "a", "eval_hash": "y", "rows": [], "sequences": {}, "commands": ["two"]}
    with pytest.raises(ValueError, match="eval_hash"):
        merge(old, new)


def test_key_covariance_variant_moves_unrelated_keys_less(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    from editing.engine.key_covariance import key_second_moments, reference_texts

    handle, names = _handle(engine_tiny_lm, bpe_tokenizer)
    facts = synthetic_examples(24, seed=4)
    modules = resolve_modules(handle.model, names)
    moments = key_second_moments(handle.model, bpe_tokenizer, modules, reference_texts(facts[:16]))
    for name, moment in moments.items():
        assert moment.shape == (weight_in_out(modules[name]).shape[0],) * 2
        torch.testing.assert_close(moment, moment.T)
    plain = parse_variant("plain=ultraedit:edit_lr=0.1")
    with pytest.raises(ValueError, match="hypernetwork methods only"):
        parse_variant("cov=ultraedit:key_covariance=10")
    covariant = parse_variant("cov=emsedit1:key_covariance=1000,edit_lr=0.01,n_batches=1")
    untrained = parse_variant("base=emsedit1:edit_lr=0.01,n_batches=1")
    assert covariant.editor.key_covariance == 1000 and covariant.settings()["editor"]["key_covariance"] == 1000
    assert plain.name == "plain"
    plan = EvaluationPlan(methods=[untrained, covariant], eval_data="synthetic:8", train_data="synthetic:16",
                          batch_size=4, batches=2)
    rows = {r["method"]: r for r in run_evaluation(plan, handle, names)["rows"]}
    assert rows["cov"]["retention"] >= rows["base"]["retention"]


def test_markdown_puts_limited_rows_of_a_full_method_in_the_data_efficiency_table() -> None:
    from editing.evaluation.report import markdown

    def row(label: str, base: str, limit: int | None) -> dict[str, Any]:
        return {"method": label, "base_method": base, "train_limit": limit, "efficacy": 90.0,
                "train_seconds_per_fact": 0.1, "edit_seconds_per_fact": 0.2, "train_facts": limit or 992}

    report = {
        "data_kind": "zsre", "model": "m", "model_fingerprint": "f" * 16, "device": "cpu", "batches": 2,
        "batch_size": 4, "eval_data": "zsre:x", "seed": 0, "mode": "sequential", "train_data": "zsre:t",
        "rows": [row("emsedit2", "emsedit2", None), row("emsedit2@K16", "emsedit2", 16), row("ft@K16", "ft", 16)],
    }
    text = markdown(report)
    main, efficiency = text.split("## Data efficiency")
    assert "| emsedit2 |" in main and "| ft@K16 |" in main and "| emsedit2@K16 |" in efficiency


def test_the_papers_methods_run_without_the_edit_memory_and_only_the_projects_rows_use_it() -> None:
    for name, spec in METHODS.items():
        if spec.family != "ft":
            assert (spec.editor.preserve_edits > 0) == name.startswith("emsedit2-mem"), name
    assert METHODS["emsedit2-mem-cov"].editor.key_covariance > 0
