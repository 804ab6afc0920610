"""Probe sets for the periodic GLUE-style probes: reading them and turning records into questions.

Tasks (SST-2, MRPC, RTE, CoLA, NLI, MMLU, and the extra sentiment_analysis and dialogue sets) come from
a directory of JSON lists in the format of `shared/data/glue_probes` (the original records: `sentence`,
`sentence1`/`sentence2`, `question`/`choices`/`answer`, `label`), or from a Hugging Face dataset id
with one configuration per task (needs the optional `datasets` package). Each record becomes a
`ProbeItem` through this project's own prompt formats (`TASK_FORMATS`); a `ProbeTask` holds the drawn
items and the few-shot examples (drawn with distinct labels) put before each of them.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editing.errors import ProbeDataError
from editing.gate.config import GateConfig
from editing.gate.specificity import probe_set_hash

Record = Mapping[str, Any]

#: Part of every probe set's hash: change it when the way items are scored changes, so that cached
#: base references computed the old way are not reused.
SCORING_SCHEME = "likelihood/prefix-cache/v1"


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
    lines = [question] + [f"{letter}. {' '.join(str(o).split())}" for letter, o in zip(letters, options, strict=True)]
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

    def prefix(self) -> str:
        """The few-shot examples, each followed by a blank line; shared by every item."""
        return "".join(shot.solved() + "\n\n" for shot in self.shots)

    def prompts(self) -> list[str]:
        """The full prompt of every item: the few-shot prefix, then the question."""
        prefix = self.prefix()
        return [prefix + item.prompt for item in self.items]

    def set_hash(self) -> str:
        """Identity of the probe set as scored (prompts, choices and the scoring scheme)."""
        return probe_set_hash(SCORING_SCHEME, self.name, self.prompts(), [item.choices for item in self.items])


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


def build_task(name: str, records: Sequence[Record], n_items: int, few_shot: int, seed: int, where: str) -> ProbeTask:
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
