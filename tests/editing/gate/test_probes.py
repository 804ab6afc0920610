"""GLUE-style probes: loading and formatting, few-shot prompts, scoring, drift against the base model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from editing.errors import ProbeDataError
from editing.gate.config import DEFAULT_PROBE_TASKS, KNOWN_PROBE_TASKS, GateConfig
from editing.gate.probe_sets import TASK_FORMATS, ProbeItem, ProbeTask, build_task, load_probe_tasks
from editing.gate.probes import DriftPolicy, ProbeReport, ProbeSuite, TaskReport, choice_scores, probes_due
from editing.gate.specificity import FrozenBase, ReferenceStore
from editing.model.scoring import answer_scores, next_token_logprobs

EDITED = "model.layers.1.mlp.down_proj.weight"


def test_every_shared_probe_file_loads_with_valid_labels(shared_data: Path) -> None:
    directory = shared_data / "glue_probes"
    config = GateConfig(probe_data=directory, probe_tasks=sorted(TASK_FORMATS), probe_items=20, few_shot=2)
    tasks = load_probe_tasks(config)
    assert [t.name for t in tasks] == sorted(TASK_FORMATS)
    for task in tasks:
        assert len(task.items) == 20 and len(task.shots) == 2
        assert [s.label for s in task.shots] == [0, 1]  # few-shot labels cycle, so neither dominates
        assert not set(task.items) & set(task.shots)
        assert all(0 <= item.label < len(item.choices) for item in task.items)
        assert all(p.startswith(task.shots[0].solved()) for p in task.prompts())
    assert load_probe_tasks(config)[0] == tasks[0]  # the same seed draws the same items
    assert load_probe_tasks(config.model_copy(update={"probe_seed": 1}))[0] != tasks[0]


@pytest.mark.parametrize(
    ("task", "record", "answer"),
    [
        ("sst2", {"sentence": "a gripping story ", "label": 1}, "positive"),
        ("sentiment_analysis", {"sentence": "dull", "label": "0"}, "negative"),
        ("cola", {"sentence": "Him went home.", "label": 0}, "No"),
        ("mrpc", {"sentence1": "A b.", "sentence2": "A  b .", "label": 1}, "Yes"),
        ("rte", {"sentence1": "It rained.", "sentence2": "It was dry.", "label": 1}, "False"),
        ("nli", {"sentence1": "It rained.", "sentence2": "It was wet.", "label": "entailment"}, "True"),
        ("mmlu", {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1}, "B"),
        ("dialogue", {"article": "m : hi", "options": ["f : hi", "f : bye"], "answers": "A"}, "A"),
    ],
)
def test_task_formats_map_labels_to_the_right_answer(task: str, record: dict[str, Any], answer: str) -> None:
    item = TASK_FORMATS[task](record)
    assert item.choices[item.label] == answer
    assert item.prompt.endswith(("Answer:", "Sentiment:"))
    assert "  " not in item.prompt  # whitespace is normalised


def test_bad_probe_data_gets_errors_naming_file_and_record(tmp_path: Path) -> None:
    with pytest.raises(ProbeDataError, match="does not exist"):
        load_probe_tasks(GateConfig(probe_data=tmp_path / "missing"))
    with pytest.raises(ProbeDataError, match=r"sst2\.json does not exist"):
        load_probe_tasks(GateConfig(probe_data=tmp_path, probe_tasks=["sst2"]))
    (tmp_path / "sst2.json").write_text(json.dumps([{"sentence": "fine", "label": 1}, {"sentence": "x", "label": 7}]))
    with pytest.raises(ProbeDataError, match=r"sst2\.json: record 1: field 'label' = 7"):
        load_probe_tasks(GateConfig(probe_data=tmp_path, probe_tasks=["sst2"]))
    (tmp_path / "cola.json").write_text("{not json")
    with pytest.raises(ProbeDataError, match="cannot read probe file"):
        load_probe_tasks(GateConfig(probe_data=tmp_path, probe_tasks=["cola"]))
    with pytest.raises(ProbeDataError, match="unknown probe task 'glue'"):
        build_task("glue", [], 1, 0, 0, "here")
    with pytest.raises(ProbeDataError, match="need more than few_shot=2"):
        build_task("sst2", [{"sentence": "a", "label": 1}], 1, 2, 0, "here")
    assert load_probe_tasks(GateConfig()) == []  # nothing configured: the standing prompts serve


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="`datasets` is installed")
def test_hub_dataset_without_the_datasets_package_says_what_to_install() -> None:
    with pytest.raises(ProbeDataError, match="pip install datasets"):
        load_probe_tasks(GateConfig(probe_dataset="nyu-mll/glue"))


def _tiny_task(choices: tuple[str, ...]) -> ProbeTask:
    items = tuple(ProbeItem(f"The capital of France is {i}. Answer:", choices, i % len(choices)) for i in range(6))
    return ProbeTask("tiny", items, shots=(ProbeItem("Who sang nice day? Answer:", choices, 0),))


def test_choice_scores_are_answer_log_likelihoods(gate_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    """Multi-token choices are teacher-forced on the full prompt; one-token choices read one pass."""
    model = gate_tiny_lm("llama")
    long_choices = ("the Beatles", "Walter Sobchak", "football")
    task = _tiny_task(long_choices)
    scores = choice_scores(model, bpe_tokenizer, task, batch_size=4)
    prompts = [p for p in task.prompts() for _ in long_choices]
    expected = answer_scores(model, bpe_tokenizer, prompts, list(long_choices) * len(task.items), 4).log_likelihood
    torch.testing.assert_close(scores, expected.view(len(task.items), 3), atol=1e-4, rtol=1e-4)

    one_token = tuple(
        c
        for c in ("Paris", "Rome", "is", "of")
        if len(bpe_tokenizer(" " + c, add_special_tokens=False)["input_ids"]) == 1
    )
    assert len(one_token) >= 2
    task = _tiny_task(one_token)
    scores = choice_scores(model, bpe_tokenizer, task, batch_size=4)
    logprobs = next_token_logprobs(model, bpe_tokenizer, [i.prompt for i in task.items], 4, prefix=task.prefix())
    ids = [bpe_tokenizer(" " + c, add_special_tokens=False)["input_ids"][0] for c in one_token]
    torch.testing.assert_close(scores, logprobs[:, ids])


def test_probe_suite_reports_drift_against_the_frozen_base(gate_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model = gate_tiny_lm("llama")
    store = ReferenceStore(FrozenBase.capture(model, "tiny", [EDITED]))
    suite = ProbeSuite([_tiny_task(("Paris", "Rome")), _tiny_task(("A", "B", "C"))], store, batch_size=8)
    clean = suite.run(model, bpe_tokenizer)
    assert clean.flip_rate == 0.0 and clean.accuracy_change == 0.0
    assert store.computed == 2  # one base reference per task
    with torch.no_grad():
        dict(model.named_parameters())[EDITED].add_(
            40.0 * torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
        )
    drifted = suite.run(model, bpe_tokenizer)
    assert drifted.flip_rate > 0.0
    assert store.computed == 2  # references are never recomputed on the edited model
    assert [t.base_accuracy for t in drifted.tasks] == [t.base_accuracy for t in clean.tasks]  # base unchanged
    json.dumps(drifted.to_dict())


def test_standing_prompts_serve_when_no_probe_data_is_configured(gate_tiny_lm: Any, bpe_tokenizer: Any) -> None:
    model = gate_tiny_lm("llama")
    store = ReferenceStore(FrozenBase.capture(model, "tiny", [EDITED]))
    suite = ProbeSuite.from_config(GateConfig(batch_size=64), store)
    report = suite.run(model, bpe_tokenizer)
    assert [t.task for t in report.tasks] == ["standing"]
    assert report.tasks[0].n_items >= 100 and not report.tasks[0].labelled
    assert report.accuracy is None and report.flip_rate == 0.0
    assert DriftPolicy(GateConfig()).decide(report).action == "continue"


def _report(accuracy: float, base: float, flip: float, kl: float | None = None) -> ProbeReport:
    tasks = (TaskReport("sst2", 50, accuracy, base, flip, True),)
    if kl is not None:
        tasks += (TaskReport("standing", 100, 1.0 - flip, 1.0, flip, False, kl),)
    return ProbeReport(tasks, 1.0, "fp")


def test_drift_policy_follows_the_configured_action() -> None:
    pause = DriftPolicy(GateConfig(max_accuracy_drop=0.05, max_flip_rate=0.2, max_kl=0.1))
    assert pause.decide(_report(0.60, 0.62, 0.1)).action == "continue"
    decision = pause.decide(_report(0.50, 0.62, 0.1))
    assert decision.action == "pause" and decision.drifted
    assert "0.120 below the base model's 0.620" in decision.reasons[0]
    assert pause.decide(_report(0.62, 0.62, 0.3)).reasons == ("prediction flip rate 0.300 > max_flip_rate 0.2",)
    assert "mean KL 0.5000 > max_kl 0.1" in pause.decide(_report(0.62, 0.62, 0.0, kl=0.5)).reasons[0]
    revert = DriftPolicy(GateConfig(drift_policy="revert"))
    assert revert.decide(_report(0.1, 0.9, 0.9)).to_dict()["action"] == "revert"


def test_standing_prompts_are_held_to_the_cumulative_budget_not_the_flip_rate() -> None:
    # Without probe data the standing prompts measure what the gate's cumulative budget bounds: a model
    # the gate admits (agreement 0.6 >= min_agreement 0.5) must not be paused by the labelled tasks'
    # flip-rate threshold, and one below the budget must be.
    policy = DriftPolicy(GateConfig(max_flip_rate=0.2, min_agreement=0.5, max_kl=2.0))

    def standing(agreement: float, kl: float = 1.0) -> ProbeReport:
        task = TaskReport("standing", 128, agreement, 1.0, 1.0 - agreement, False, kl)
        return ProbeReport((task,), 1.0, "fp")

    assert policy.decide(standing(0.6)).action == "continue"
    assert policy.decide(standing(0.45)).reasons == (
        "standing prompts: agreement with the base model 0.450 < min_agreement 0.5",
    )
    assert policy.decide(standing(0.9, kl=2.5)).reasons == ("standing prompts: mean KL 2.5000 > max_kl 2.0",)
    # beside labelled tasks, the flip rate is theirs alone
    mixed = ProbeReport(
        (TaskReport("sst2", 50, 0.6, 0.6, 0.1, True), TaskReport("standing", 100, 0.6, 1.0, 0.4, False, 1.0)),
        1.0,
        "fp",
    )
    assert policy.decide(mixed).action == "continue"
    flipped = ProbeReport((TaskReport("sst2", 50, 0.6, 0.6, 0.3, True), *mixed.tasks[1:]), 1.0, "fp")
    assert policy.decide(flipped).reasons == ("prediction flip rate 0.300 > max_flip_rate 0.2",)


def test_probes_are_due_by_commits_or_by_minutes_with_something_new() -> None:
    config = GateConfig(probe_every_commits=4, probe_every_minutes=30)
    assert not probes_due(config, 3, 10)
    assert probes_due(config, 4, 0)
    assert probes_due(config, 1, 31)
    assert not probes_due(config, 0, 600)  # nothing committed since: the model has not changed
    assert not probes_due(GateConfig(probe_every_commits=0, probe_every_minutes=0), 100, 600)


def test_probe_task_names_are_checked_when_the_configuration_loads() -> None:
    assert set(DEFAULT_PROBE_TASKS) == {"sst2", "mrpc", "rte", "cola", "nli", "mmlu"}
    assert set(KNOWN_PROBE_TASKS) == set(TASK_FORMATS)
    with pytest.raises(ValidationError, match="unknown probe task"):
        GateConfig(probe_tasks=["sst2", "squad"])
    with pytest.raises(ValidationError, match="must not repeat"):
        GateConfig(probe_tasks=["sst2", "sst2"])


@pytest.mark.real_model
def test_real_model_probe_run_is_consistent_with_its_base(
    default_model: Any, shared_data: Path, tmp_path: Path
) -> None:
    """Unedited SmolLM2 on a tiny SST-2 set: no flips, live accuracy equals base, references persisted."""
    config = GateConfig(probe_data=shared_data / "glue_probes", probe_tasks=["sst2"], probe_items=4, few_shot=1)
    store = ReferenceStore(FrozenBase(default_model.fingerprint, {}), tmp_path)
    report = ProbeSuite.from_config(config, store).run(default_model.model, default_model.tokenizer)
    (task,) = report.tasks
    assert (task.task, task.n_items, task.flip_rate) == ("sst2", 4, 0.0)
    assert task.accuracy == task.base_accuracy
    assert len(list(tmp_path.rglob("probe-sst2-*.safetensors"))) == 1
    assert DriftPolicy(config).decide(report).action == "continue"
