"""Periodic GLUE-style probes of the live model and its drift from the frozen base model.

- Probe tasks (SST-2, MRPC, RTE, CoLA, NLI, MMLU, and the extra sentiment_analysis and dialogue sets) are
  read from a directory of JSON lists in the format of `shared/data/glue_probes` (the original records:
  `sentence`, `sentence1`/`sentence2`, `question`/`choices`/`answer`, `label`), or from a Hugging Face
  dataset id with one configuration per task (needs the optional `datasets` package).
- Each item becomes a few-shot prompt (`few_shot` solved examples of the same task, drawn with distinct
  labels) and is scored by answer likelihood: the choice with the highest teacher-forced log-likelihood
  is the prediction. The prompt formats are this project's own (`TASK_FORMATS`).
- `ProbeSuite.run` compares the live model with the base model: accuracy change and the share of items
  whose prediction flipped. Base predictions come from a `ReferenceStore` (computed once per base
  fingerprint and probe set). Without probe data, the standing prompts serve, with the base model's
  next-token distributions as reference (agreement plays the role of accuracy).
- `DriftPolicy.decide` turns a report into an action (continue, pause, revert); `probes_due` says when
  the next run is due. Every report is JSON-serialisable (`to_dict`) for the ledger.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from editing.errors import DataFormatError, ProbeDataError
from editing.gate_config import GateConfig
from editing.scoring import answer_scores, next_token_logprobs
from editing.specificity import ReferenceStore, SpecificityCheck, probe_set_hash, standing_prompts
from editing.tokenise import encode_answer

Record = Mapping[str, Any]


@dataclass(frozen=True)
class ProbeItem:
    """One multiple-choice question: `prompt` ends where the answer goes; `choices[label]` is right."""

    prompt: str
    choices: tuple[str, ...]
    label: int

    def solved(self) -> str:
        """The item with its answer, as a few-shot example."""
        return f"{self.prompt} {self.choices[self.label]}"


def _text(record: Record, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ProbeDataError(f"field {field!r} is missing or empty")
    return " ".join(value.split())


def _label(record: Record, field: str, names: Sequence[str]) -> int:
    """An integer label, a digit string, or one of `names` (e.g. 'entailment', 'B') as its index."""
    value = record.get(field)
    if isinstance(value, str) and value.strip() in names:
        return list(names).index(value.strip())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    raise ProbeDataError(f"field {field!r} = {value!r} is not a label in {list(names)}")


def _sentiment(record: Record) -> ProbeItem:
    prompt = f"Review: {_text(record, 'sentence')}\nSentiment:"
    return ProbeItem(prompt, ("negative", "positive"), _label(record, "label", ("0", "1")))


def _acceptability(record: Record) -> ProbeItem:
    prompt = f"Sentence: {_text(record, 'sentence')}\nIs this sentence grammatical?\nAnswer:"
    return ProbeItem(prompt, ("No", "Yes"), _label(record, "label", ("0", "1")))


def _paraphrase(record: Record) -> ProbeItem:
    prompt = (
        f"Sentence 1: {_text(record, 'sentence1')}\nSentence 2: {_text(record, 'sentence2')}\n"
        "Do both sentences mean the same thing?\nAnswer:"
    )
    return ProbeItem(prompt, ("No", "Yes"), _label(record, "label", ("0", "1")))


def _entailment(record: Record) -> ProbeItem:
    # GLUE RTE and the NLI set: label 0 / 'entailment' means the hypothesis follows
    prompt = f"{_text(record, 'sentence1')}\nQuestion: {_text(record, 'sentence2')} True or False?\nAnswer:"
    return ProbeItem(prompt, ("True", "False"), _label(record, "label", ("entailment", "not_entailment")))


def _lettered(question: str, options: Sequence[Any]) -> tuple[str, tuple[str, ...]]:
    letters = tuple("ABCDEFGH"[: len(options)])
    if len(options) < 2 or len(options) > len("ABCDEFGH"):
        raise ProbeDataError(f"expected 2 to 8 options, got {len(options)}")
    lines = [question] + [
        f"{letter}. {' '.join(str(o).split())}" for letter, o in zip(letters, options, strict=True)
    ]
    return "\n".join(lines) + "\nAnswer:", letters


def _multiple_choice(record: Record) -> ProbeItem:
    choices = record.get("choices")
    if not isinstance(choices, list):
        raise ProbeDataError("field 'choices' is missing or not a list")
    prompt, letters = _lettered(f"Question: {_text(record, 'question')}", choices)
    return ProbeItem(prompt, letters, _label(record, "answer", letters))


def _dialogue(record: Record) -> ProbeItem:
    options = record.get("options")
    if not isinstance(options, list):
        raise ProbeDataError("field 'options' is missing or not a list")
    prompt, letters = _lettered(f"Conversation: {_text(record, 'article')}\nWhich reply fits best?", options)
    return ProbeItem(prompt, letters, _label(record, "answers", letters))


#: How each task's records become items. Adding a task is adding a row.
TASK_FORMATS: dict[str, Callable[[Record], ProbeItem]] = {
    "sst2": _sentiment,
    "sentiment_analysis": _sentiment,
    "cola": _acceptability,
    "mrpc": _paraphrase,
    "rte": _entailment,
    "nli": _entailment,
    "mmlu": _multiple_choice,
    "dialogue": _dialogue,
}


@dataclass(frozen=True)
class ProbeTask:
    """The scored items of one task and the solved examples put before each of them."""

    name: str
    items: tuple[ProbeItem, ...]
    shots: tuple[ProbeItem, ...] = ()

    def prompts(self) -> list[str]:
        """The full prompt of every item: the few-shot examples, a blank line, the question."""
        prefix = "".join(shot.solved() + "\n\n" for shot in self.shots)
        return [prefix + item.prompt for item in self.items]

    def set_hash(self) -> str:
        """Identity of the probe set as scored (prompts and choices)."""
        return probe_set_hash(self.name, self.prompts(), [item.choices for item in self.items])


def _pick_shots(items: list[ProbeItem], few_shot: int) -> list[int]:
    """Indices of `few_shot` items whose labels cycle 0, 1, ... so no label dominates the examples."""
    picked: list[int] = []
    for k in range(few_shot):
        wanted = k % len(items[0].choices)
        free = [i for i in range(len(items)) if i not in picked]
        matching = [i for i in free if items[i].label == wanted]
        if free:
            picked.append((matching or free)[0])
    return picked


def build_task(
    name: str, records: Sequence[Record], n_items: int, few_shot: int, seed: int, where: str
) -> ProbeTask:
    """Format `records` as task `name`, shuffle with `seed`, take the shots, then up to `n_items` items."""
    if name not in TASK_FORMATS:
        raise ProbeDataError(f"unknown probe task {name!r}; known: {', '.join(sorted(TASK_FORMATS))}")
    items: list[ProbeItem] = []
    for index, record in enumerate(records):
        try:
            items.append(TASK_FORMATS[name](record))
        except ProbeDataError as exc:
            raise ProbeDataError(f"{where}: record {index}: {exc}") from None
    if len(items) <= few_shot:
        raise ProbeDataError(f"{where}: {len(items)} records, need more than few_shot={few_shot}")
    random.Random(f"{seed}:{name}").shuffle(items)
    shots = _pick_shots(items, few_shot)
    rest = [item for i, item in enumerate(items) if i not in shots]
    return ProbeTask(name, tuple(rest[:n_items]), tuple(items[i] for i in shots))


def load_task_file(path: Path) -> list[Record]:
    """The records of one probe file (a JSON list of objects)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProbeDataError(f"probe file {path} does not exist; expected <probe_data>/<task>.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProbeDataError(f"cannot read probe file {path}: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ProbeDataError(f"probe file {path} must hold a JSON list of objects")
    return data


def load_tasks_from_directory(directory: Path, config: GateConfig) -> list[ProbeTask]:
    """The configured tasks from `<directory>/<task>.json`."""
    if not directory.is_dir():
        raise ProbeDataError(f"probe data directory {directory} does not exist (gate.probe_data)")
    return [
        build_task(
            name,
            load_task_file(directory / f"{name}.json"),
            config.probe_items,
            config.few_shot,
            config.probe_seed,
            str(directory / f"{name}.json"),
        )
        for name in config.probe_tasks
    ]


def load_tasks_from_hub(dataset_id: str, config: GateConfig) -> list[ProbeTask]:
    """The configured tasks from a Hugging Face dataset, one configuration per task (needs `datasets`)."""
    if importlib.util.find_spec("datasets") is None:
        raise ProbeDataError(
            f"gate.probe_dataset is {dataset_id!r} but the `datasets` package is not installed: "
            "pip install datasets, or download the sets and point gate.probe_data at the directory"
        )
    import datasets  # optional dependency, imported only here

    tasks = []
    for name in config.probe_tasks:
        where = f"{dataset_id} ({name}, {config.probe_split})"
        try:
            records = [dict(r) for r in datasets.load_dataset(dataset_id, name, split=config.probe_split)]
        except (OSError, ValueError) as exc:  # missing set or configuration, no network, bad split name
            raise ProbeDataError(f"cannot load probe set {where}: {exc}") from exc
        tasks.append(build_task(name, records, config.probe_items, config.few_shot, config.probe_seed, where))
    return tasks


def load_probe_tasks(config: GateConfig) -> list[ProbeTask]:
    """The configured probe tasks: `probe_data`, else `probe_dataset`, else none (standing prompts)."""
    if config.probe_data is not None:
        return load_tasks_from_directory(config.probe_data, config)
    if config.probe_dataset:
        return load_tasks_from_hub(config.probe_dataset, config)
    return []


def choice_scores(model: nn.Module, tokenizer: Any, task: ProbeTask, batch_size: int) -> torch.Tensor:
    """(N, C) log-likelihood of every choice of every item (one pass per item when choices are one token)."""
    prompts = task.prompts()
    n_choices = {len(item.choices) for item in task.items}
    try:
        ids = [
            [encode_answer(tokenizer, c, p) for c in item.choices]
            for p, item in zip(prompts, task.items, strict=True)
        ]
    except DataFormatError as exc:
        raise ProbeDataError(f"task {task.name}: {exc}") from None
    if len(n_choices) == 1 and all(len(t) == 1 for row in ids for t in row):
        logprobs = next_token_logprobs(model, tokenizer, prompts, batch_size)
        index = torch.tensor([[t[0] for t in row] for row in ids])
        return logprobs.gather(1, index)
    flat_prompts = [p for p, item in zip(prompts, task.items, strict=True) for _ in item.choices]
    flat_answers = [c for item in task.items for c in item.choices]
    loglik = answer_scores(model, tokenizer, flat_prompts, flat_answers, batch_size).log_likelihood
    width = max(n_choices)
    out = torch.full((len(task.items), width), float("-inf"))
    start = 0
    for i, item in enumerate(task.items):
        out[i, : len(item.choices)] = loglik[start : start + len(item.choices)]
        start += len(item.choices)
    return out


@dataclass(frozen=True)
class TaskReport:
    """One task's scores against the base model. For the standing set, accuracy is agreement with the base."""

    task: str
    n_items: int
    accuracy: float
    base_accuracy: float
    flip_rate: float  #: share of items whose prediction differs from the base model's
    labelled: bool  #: False for the standing prompts (no gold answers)
    mean_kl: float | None = None  #: standing prompts only: mean KL(base || live) of next-token distributions

    @property
    def accuracy_change(self) -> float:
        return self.accuracy - self.base_accuracy


@dataclass(frozen=True)
class ProbeReport:
    """A probe run: per-task reports and the pooled figures the drift policy reads."""

    tasks: tuple[TaskReport, ...]
    seconds: float
    base_fingerprint: str

    def _pooled(self, labelled_only: bool, value: Callable[[TaskReport], float]) -> float | None:
        chosen = [t for t in self.tasks if t.labelled or not labelled_only]
        total = sum(t.n_items for t in chosen)
        return sum(value(t) * t.n_items for t in chosen) / total if total else None

    @property
    def accuracy(self) -> float | None:
        """Pooled accuracy over the labelled tasks (None when there are none)."""
        return self._pooled(True, lambda t: t.accuracy)

    @property
    def base_accuracy(self) -> float | None:
        return self._pooled(True, lambda t: t.base_accuracy)

    @property
    def accuracy_change(self) -> float | None:
        """Pooled accuracy minus the base model's (negative is a drop); None without labelled tasks."""
        return self._pooled(True, lambda t: t.accuracy_change)

    @property
    def flip_rate(self) -> float:
        """Pooled share of items (all tasks) whose prediction differs from the base model's."""
        return self._pooled(False, lambda t: t.flip_rate) or 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record for the ledger."""
        tasks = [dict(asdict(t), accuracy_change=t.accuracy_change) for t in self.tasks]
        return {
            "tasks": tasks,
            "accuracy": self.accuracy,
            "base_accuracy": self.base_accuracy,
            "accuracy_change": self.accuracy_change,
            "flip_rate": self.flip_rate,
            "seconds": self.seconds,
            "base_fingerprint": self.base_fingerprint,
        }


class ProbeSuite:
    """The periodic probes: labelled tasks, or the standing prompts when there are none."""

    def __init__(
        self,
        tasks: Sequence[ProbeTask],
        references: ReferenceStore,
        *,
        standing: Sequence[str] = (),
        batch_size: int = 16,
    ) -> None:
        self.tasks = list(tasks)
        self.references = references
        self.batch_size = batch_size
        self.standing = SpecificityCheck(references, standing, batch_size) if standing else None

    @classmethod
    def from_config(cls, config: GateConfig, references: ReferenceStore) -> ProbeSuite:
        """The suite the configuration asks for; the standing prompts when no probe data is configured."""
        tasks = load_probe_tasks(config)
        return cls(
            tasks, references, standing=() if tasks else standing_prompts(), batch_size=config.batch_size
        )

    def _task_report(self, model: nn.Module, tokenizer: Any, task: ProbeTask) -> TaskReport:
        def compute(m: nn.Module) -> dict[str, torch.Tensor]:
            return {"scores": choice_scores(m, tokenizer, task, self.batch_size)}

        base = self.references.get(model, f"probe-{task.name}", task.set_hash(), compute, persist=True)[
            "scores"
        ]
        live = choice_scores(model, tokenizer, task, self.batch_size)
        labels = torch.tensor([item.label for item in task.items])
        base_pred, live_pred = base.argmax(-1), live.argmax(-1)
        return TaskReport(
            task=task.name,
            n_items=len(task.items),
            accuracy=(live_pred == labels).float().mean().item(),
            base_accuracy=(base_pred == labels).float().mean().item(),
            flip_rate=(live_pred != base_pred).float().mean().item(),
            labelled=True,
        )

    def _standing_report(self, model: nn.Module, tokenizer: Any, check: SpecificityCheck) -> TaskReport:
        result = check.measure(model, tokenizer)
        return TaskReport(
            "standing", result.n_prompts, result.agreement, 1.0, 1.0 - result.agreement, False, result.mean_kl
        )

    def run(self, model: nn.Module, tokenizer: Any) -> ProbeReport:
        """Score the live model on every task and compare with the base model (references cached)."""
        started = time.perf_counter()
        reports = [self._task_report(model, tokenizer, task) for task in self.tasks]
        if self.standing is not None:
            reports.append(self._standing_report(model, tokenizer, self.standing))
        return ProbeReport(tuple(reports), time.perf_counter() - started, self.references.fingerprint)


DriftAction = Literal["continue", "pause", "revert"]


@dataclass(frozen=True)
class DriftDecision:
    """What the daemon should do after a probe run, and why."""

    action: DriftAction
    reasons: tuple[str, ...]  #: empty when every threshold holds

    @property
    def drifted(self) -> bool:
        return self.action != "continue"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "reasons": list(self.reasons)}


class DriftPolicy:
    """Compares a probe report with the configured drift thresholds and names the configured action."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config

    def reasons(self, report: ProbeReport) -> list[str]:
        """One line per threshold the report passes (empty: no drift)."""
        out = []
        change = report.accuracy_change
        if change is not None and -change > self.config.max_accuracy_drop:
            out.append(
                f"probe accuracy {report.accuracy:.3f} is {-change:.3f} below the base model's "
                f"{report.base_accuracy:.3f} (max_accuracy_drop {self.config.max_accuracy_drop})"
            )
        if report.flip_rate > self.config.max_flip_rate:
            out.append(
                f"prediction flip rate {report.flip_rate:.3f} > max_flip_rate {self.config.max_flip_rate}"
            )
        for task in report.tasks:
            if task.mean_kl is not None and task.mean_kl > self.config.max_kl:
                out.append(f"{task.task} prompts: mean KL {task.mean_kl:.4f} > max_kl {self.config.max_kl}")
        return out

    def decide(self, report: ProbeReport) -> DriftDecision:
        """'continue' when every threshold holds, else the configured policy ('pause' or 'revert')."""
        reasons = self.reasons(report)
        return DriftDecision(self.config.drift_policy if reasons else "continue", tuple(reasons))


def probes_due(config: GateConfig, commits_since_last: int, minutes_since_last: float) -> bool:
    """True when the periodic probes are due (`probe_every_commits` commits, or `probe_every_minutes`
    minutes with at least one commit since the last run)."""
    by_count = config.probe_every_commits > 0 and commits_since_last >= config.probe_every_commits
    by_time = (
        config.probe_every_minutes > 0
        and commits_since_last > 0
        and minutes_since_last >= config.probe_every_minutes
    )
    return by_count or by_time
