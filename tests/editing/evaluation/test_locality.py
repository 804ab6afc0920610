"""The locality measures of `editing.evaluation.locality` on tiny models: confident retention, KL against the
unedited model, known facts, probes, the null edits, the daemon-default row and old reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from editing.data import EditExample
from editing.engine.deltas import apply, master_copies, restore, snapshot
from editing.engine.synthetic import synthetic_examples
from editing.evaluation.harness import measure_null_edit
from editing.evaluation.locality import (
    LOCALITY_METRICS,
    LocalityOptions,
    confident_labels,
    known_fact_candidates,
    measure_model,
    measure_reference,
    row_locality,
)
from editing.evaluation.margins import main as margins_main
from editing.evaluation.methods import METHODS, ModelHandle, daemon_default_method, get_method
from editing.evaluation.report import main as report_main
from editing.evaluation.report import markdown, merge
from editing.evaluation.runner import EvaluationPlan, evaluation_batches, known_fact_pool, run_evaluation
from editing.evaluation.scores import score_batch
from editing.model.edit_metrics import agreement
from editing.model.loading import model_fingerprint
from editing.model.scoring import answer_scores
from editing.model.tokenise import IGNORE_INDEX, encode_answer

ZERO_EXACT = {"retention": 100.0, "confident_retention": 100.0, "mean_kl": 0.0, "standing_kl": 0.0,
              "known_fact_retention": 100.0, "probe_flip_rate": 0.0}


@pytest.fixture
def sharp_model(engine_tiny_lm: Any) -> tuple[torch.nn.Module, list[str]]:
    """A tiny llama whose final norm is scaled up: a random model is unsure everywhere, this one is sure of some."""
    model, names = engine_tiny_lm("llama", seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    return model, names


def _wreck(model: torch.nn.Module, name: str) -> None:
    """A known edit: one edited weight scaled by -3 (through the harness's `apply`)."""
    masters = master_copies(model, [name])
    apply(model, {name: -4.0 * masters[name]}, masters)


def test_confident_retention_counts_only_positions_where_the_unedited_model_was_sure() -> None:
    # one row, two answer positions: the unedited model is sure of token 0 at the first (p ≈ 0.98), unsure at
    # the second (p ≈ 0.4); the edited model changes its mind at the first position only
    reference = torch.tensor([[[6.0, 2.0, 0.0], [0.5, 0.1, 0.2]]]).log_softmax(-1)
    edited = torch.tensor([[[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 0]])
    confident = confident_labels(reference, labels)
    assert confident.tolist() == [[0, IGNORE_INDEX]]
    assert agreement(edited, reference, labels).item() == 0.5  # plain retention: one of two positions agrees
    assert agreement(edited, reference, confident).item() == 0.0  # the confident one did not


def test_kl_is_zero_unedited_and_positive_after_a_known_edit(
    sharp_model: tuple[torch.nn.Module, list[str]], bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    model, names = sharp_model
    facts = synthetic_examples(6, seed=1)
    base = snapshot(model, names)
    unedited = row_locality(model, bpe_tokenizer, facts, base, counterfact=True)
    assert set(unedited.mean_kl) == {0.0} and set(unedited.retention) == {1.0}
    assert unedited.confident_retention and set(unedited.confident_retention) == {1.0}
    reference = score_batch(model, bpe_tokenizer, facts, "counterfact")[1]
    _wreck(model, names[1])
    try:
        edited = row_locality(model, bpe_tokenizer, facts, base, counterfact=True)
        scores = score_batch(model, bpe_tokenizer, facts, "counterfact", reference)[0]
    finally:
        restore(model, base)
    assert min(edited.mean_kl) > 0 and min(edited.retention) < 1
    # the row measure's retention is the report's, computed the same way; the neighbourhood score is LS
    assert scores.retention == edited.retention
    assert scores.neighbourhood_score == edited.neighbourhood_score == scores.specificity


def _probe_dir(tmp_path: Path) -> Path:
    """The six default probe tasks, four short records each (two go into the few-shot prefix)."""
    folder = tmp_path / "probes"
    folder.mkdir()
    pairs = [("The capital of France is Paris.", "Paris is in France."), ("Who sang nice day?", "Anna Berg.")] * 2
    records = {
        "sst2": [{"sentence": a, "label": i % 2} for i, (a, _) in enumerate(pairs)],
        "cola": [{"sentence": b, "label": i % 2} for i, (_, b) in enumerate(pairs)],
        "mrpc": [{"sentence1": a, "sentence2": b, "label": i % 2} for i, (a, b) in enumerate(pairs)],
        "rte": [{"sentence1": a, "sentence2": b, "label": i % 2} for i, (a, b) in enumerate(pairs)],
        "nli": [{"sentence1": b, "sentence2": a, "label": i % 2} for i, (a, b) in enumerate(pairs)],
        "mmlu": [{"question": a, "choices": ["Rome", "Paris"], "answer": i % 2} for i, (a, _) in enumerate(pairs)],
    }
    for name, rows in records.items():
        (folder / f"{name}.json").write_text(json.dumps(rows))
    return folder


def _known_pool(model: torch.nn.Module, tokenizer: Any) -> list[EditExample]:
    """Facts whose true answer is the model's own top-1 next token (where that token is a whole answer)."""
    pool = []
    for fact in synthetic_examples(40, seed=9):
        for prompt in (fact.prompt, *fact.rephrase_prompts):
            ids = [int(i) for i in tokenizer(prompt)["input_ids"]]
            top = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            answer = tokenizer.decode([top]).strip()
            if answer and encode_answer(tokenizer, answer, prompt) == [top]:
                pool.append(EditExample(prompt, "x", target_true=answer))
    return pool


def test_the_zero_edit_is_exact_and_the_self_edit_measured(
    tmp_path: Path, sharp_model: tuple[torch.nn.Module, list[str]], bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    model, names = sharp_model
    facts = synthetic_examples(8, seed=1)
    stream = [facts[:4], facts[4:]]
    options = LocalityOptions(known_facts=3, probe_data=_probe_dir(tmp_path), probe_limit=2)
    reference = measure_reference(model, bpe_tokenizer, stream, _known_pool(model, bpe_tokenizer), options, seed=0)
    assert reference.known.pairs and reference.probes and reference.self_batch
    # the self edit asks for the model's own answers: likelier than the real targets, with as many tokens
    own, real = list(reference.self_batch), {fact.prompt: fact.target_new for fact in stream[0]}
    mine = answer_scores(model, bpe_tokenizer, [f.prompt for f in own], [f.target_new for f in own], 16)
    theirs = answer_scores(model, bpe_tokenizer, [f.prompt for f in own], [real[f.prompt] for f in own], 16)
    assert bool((mine.log_likelihood > theirs.log_likelihood).all())
    assert measure_model(model, bpe_tokenizer, reference) == {"standing_kl": 0.0, "known_fact_retention": 100.0,
                                                               "probe_flip_rate": 0.0}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero = measure_null_edit(model, bpe_tokenizer, stream, "zsre", reference, module_names=names)
    assert {k: zero[k] for k in ZERO_EXACT} == ZERO_EXACT
    method = _prepared(model, bpe_tokenizer, names)
    floor = measure_null_edit(model, bpe_tokenizer, stream, "zsre", reference, method=method)
    assert set(floor) >= set(ZERO_EXACT) and 0 <= floor["retention"] <= 100 and floor["mean_kl"] >= 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the null edits leave the model"


def _prepared(model: torch.nn.Module, tokenizer: Any, names: list[str]) -> Any:
    from editing.evaluation.methods import prepare

    handle = ModelHandle(model, tokenizer, model_fingerprint(model), "llama")
    return prepare(get_method("ultraedit"), handle, names, [])


def test_known_facts_come_from_outside_the_edited_stream(tmp_path: Path) -> None:
    facts = synthetic_examples(20, seed=5)
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([f.to_json() for f in facts]))
    plan = EvaluationPlan(methods=[get_method("ft")], eval_data=f"examples:{path}", batch_size=4, batches=3)
    stream = [fact for batch in evaluation_batches(plan) for fact in batch]
    pool = known_fact_pool(plan)
    assert len(pool) == 8 and not {f.prompt for f in pool} & {f.prompt for f in stream}
    assert sorted(f.prompt for f in pool + stream) == sorted(f.prompt for f in facts)
    candidates = known_fact_candidates(facts, stream)
    used = {p for f in stream for p in (f.prompt, *f.rephrase_prompts, *(q for q, _ in f.locality))}
    assert candidates and not {prompt for prompt, _ in candidates} & used
    assert (pool[0].prompt, pool[0].target_true) in known_fact_candidates(pool, stream)


def test_rows_carry_the_locality_fields_and_one_is_the_daemon_default(
    tmp_path: Path, engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None
) -> None:
    assert daemon_default_method() == "emsedit2-mem"
    assert [name for name in METHODS if name == daemon_default_method()] == ["emsedit2-mem"]
    model, names = engine_tiny_lm("llama", seed=0)
    handle = ModelHandle(model, bpe_tokenizer, model_fingerprint(model), "llama")
    plan = EvaluationPlan(
        methods=[get_method("emsedit2-mem"), get_method("emsedit2"), get_method("ultraedit")],
        eval_data="synthetic:24", train_data="synthetic:16", batch_size=4, batches=2,
        locality=LocalityOptions(known_facts=4, probe_data=_probe_dir(tmp_path), probe_limit=2),
    )
    report = run_evaluation(plan, handle, names)
    assert [row["method"] for row in report["rows"] if row["daemon_default"]] == ["emsedit2-mem"]
    for row in report["rows"]:
        for name in ("efficacy", "generalization", "retention", *LOCALITY_METRICS):
            assert name in row and (row[name] is None or isinstance(row[name], float)), (row["method"], name)
        assert isinstance(row["mean_kl"], float) and isinstance(row["probe_flip_rate"], float)
        assert {k: row["null_edit"]["zero"][k] for k in ("retention", "mean_kl", "standing_kl", "probe_flip_rate")} == {
            "retention": 100.0, "mean_kl": 0.0, "standing_kl": 0.0, "probe_flip_rate": 0.0}
        assert "retention" in row["null_edit"]["self"] and row["locality_seconds"] >= 0
    assert report["locality"]["probe_items"] == 12 and report["unedited"]["mean_kl"] == 0.0
    assert "mean_kl" in report["sequences"]["ultraedit"]["per_batch"][0]
    text = markdown(report)
    assert "## Locality" in text and "exact, as it must be" in text and "`emsedit2-mem` is the daemon's default" in text


def test_counterfact_rows_carry_the_neighbourhood_score(
    engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None, tmp_path: Path
) -> None:
    records = [
        {"prompt": e.prompt, "subject": e.subject, "target_new": e.target_new, "ground_truth": e.target_true,
         "rephrase_prompt": e.rephrase_prompts[0], "locality_prompt": e.locality[0][0],
         "locality_ground_truth": e.locality[0][1]}
        for e in synthetic_examples(12, seed=2)
    ]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    model, names = engine_tiny_lm("llama", seed=0)
    handle = ModelHandle(model, bpe_tokenizer, model_fingerprint(model), "llama")
    plan = EvaluationPlan(methods=[get_method("ultraedit")], eval_data=f"counterfact:{path}", batch_size=4, batches=2,
                          locality=LocalityOptions(known_facts=0, null_edit=False))
    report = run_evaluation(plan, handle, names)
    row = report["rows"][0]
    assert row["neighbourhood_score"] == row["specificity"]
    assert report["unedited"]["neighbourhood_score"] == report["unedited"]["specificity"]
    assert row["known_fact_retention"] is None and row["null_edit"] == {"zero": {}, "self": {}}
    assert "| neighbourhood |" in markdown(report)


def test_batch_mode_measures_each_batch_alone(engine_tiny_lm: Any, bpe_tokenizer: Any, engine_single_thread: None) -> None:
    model, names = engine_tiny_lm("llama", seed=0)
    handle = ModelHandle(model, bpe_tokenizer, model_fingerprint(model), "llama")
    plan = EvaluationPlan(methods=[get_method("ultraedit")], eval_data="synthetic:8", batch_size=4, batches=2,
                          mode="batch", locality=LocalityOptions(known_facts=0, null_edit=False))
    report = run_evaluation(plan, handle, names)
    per_batch = report["sequences"]["ultraedit"]["per_batch"]
    assert all("standing_kl" in m and "mean_kl" in m for m in per_batch)
    assert report["rows"][0]["standing_kl"] == pytest.approx(sum(m["standing_kl"] for m in per_batch) / 2, abs=1e-4)


def test_an_old_report_without_the_locality_fields_still_renders(tmp_path: Path) -> None:
    old = {
        "model": "m", "model_fingerprint": "f" * 16, "device": "cpu", "data_kind": "zsre", "eval_data": "zsre:x",
        "batches": 2, "batch_size": 4, "seed": 0, "mode": "sequential", "train_data": None,
        "unedited": {"efficacy": 20.0, "generalization": 20.0, "specificity": 20.0, "retention": 100.0},
        "rows": [
            {"method": m, "base_method": m, "efficacy": 90.0, "generalization": 80.0, "specificity": 20.0,
             "retention": 30.0, "average": 63.3, "train_seconds_per_fact": 0.1, "edit_seconds_per_fact": 0.1,
             "train_facts": 16}
            for m in ("emsedit2", "ft")
        ],
        "sequences": {m: {"per_batch": [{"average": 60.0 + i}, {"average": 62.0}], "curve": []}
                      for i, m in enumerate(("emsedit2", "ft"))},
    }
    text = markdown(old)
    assert "| emsedit2 |" in text and "## Locality" not in text and "daemon's default" not in text
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert report_main([str(path)]) == 0
    assert "| ft |" in (tmp_path / "old.md").read_text() and (tmp_path / "old.png").is_file()
    assert margins_main([str(path), "--method", "emsedit2"]) == 0
    # a new row merged beside old ones: the old rows show "-" for what they did not measure
    new_row = dict(old["rows"][0], method="new", confident_retention=50.0, mean_kl=0.25, daemon_default=True,
                   null_edit={"zero": {"retention": 100.0, "mean_kl": 0.0}, "self": {"retention": 90.0}})
    text = markdown(dict(old, rows=[*old["rows"], new_row]))
    assert "| ft | 30.0 | - | - |" in text and "| new | 30.0 | 50.0 | 0.25 |" in text
    assert "exact, as it must be" in text and "`new` is the daemon's default" in text


def test_a_new_report_merges_into_an_old_one_of_the_same_weights_under_another_fingerprint() -> None:
    common = {"eval_hash": "x", "data_kind": "zsre", "mode": "sequential", "batch_size": 4, "batches": 2, "seed": 0}
    scores = {"efficacy": 20.0, "retention": 100.0}
    old = {**common, "model_fingerprint": "a", "unedited": scores, "rows": [{"method": "ft"}], "commands": []}
    new = {**common, "model_fingerprint": "b", "unedited": scores | {"mean_kl": 0.0}, "rows": [{"method": "x"}],
           "sequences": {}, "commands": []}
    assert [r["method"] for r in merge(old, new)["rows"]] == ["ft", "x"]
    with pytest.raises(ValueError, match="different models"):
        merge(old, dict(new, unedited={"efficacy": 21.0, "mean_kl": 0.0}))
