"""One evaluation run: the same facts, order, seed and model for every method, one report at the end.

`run_evaluation(plan, handle, module_names)` loads the evaluation facts (shuffled with the seed, the first
batches × batch_size kept), scores the unedited model once (the retention reference), then prepares each
method (checkpoint, reused or newly trained editor, or training-free) and runs it over the stream
(`harness.run_stream`). After every method the partial report goes to `on_row`, so a long run that is
stopped keeps the rows it finished.

With `plan.locality` (the default) the unedited model is also measured once for the locality measures
(`locality.measure_reference`: standing prompts, known facts, probes, the self-edit facts), the zero edit is
measured once, and every row carries the locality measures and its null edits (docs/locality.md).
"""

from __future__ import annotations

import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from editing.data import EditExample, examples_hash, load_examples
from editing.engine.checkpoint import code_version
from editing.errors import DataFormatError
from editing.evaluation.harness import Mode, measure_baseline, measure_null_edit, run_stream
from editing.evaluation.locality import LocalityOptions, ModelReference, measure_reference
from editing.evaluation.methods import MethodSpec, ModelHandle, daemon_default_method, prepare
from editing.evaluation.report import make_row, make_sequence, train_data_of
from editing.evaluation.scores import DataKind, pool


@dataclass(frozen=True)
class EvaluationPlan:
    """What to run: methods, data, stream shape and where trained editors come from."""

    methods: Sequence[MethodSpec]
    eval_data: str  # zsre:PATH | counterfact:PATH (examples:PATH and synthetic:N are scored like ZsRE)
    train_data: str | None = None
    train_limit: int | None = None  # train on the first K facts of train_data only
    mode: Mode = "sequential"
    batch_size: int = 16
    batches: int = 32
    seed: int = 0
    eval_offset: int = 0  # skip the first N evaluation facts (e.g. the part of a training file trained on)
    curve_every: int = 0
    eval_batch_size: int = 16
    checkpoints: dict[str, Path] = field(default_factory=dict)  # method name -> trained editor directory
    editors_dir: Path | None = None
    locality: LocalityOptions | None = field(default_factory=LocalityOptions)  # None: retention only

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.batches < 1:
            raise ValueError(f"batch size and batches must be at least 1, got {self.batch_size} and {self.batches}")
        if self.eval_offset < 0:
            raise ValueError(f"--data-offset must be at least 0, got {self.eval_offset}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"--train-limit must be at least 1, got {self.train_limit}")
        if not self.methods:
            raise ValueError("no method to evaluate")


def data_kind(spec: str) -> DataKind:
    """Which metrics a data spec gets: CounterFact's for counterfact:PATH, ZsRE's (token accuracy) otherwise."""
    kind = spec.partition(":")[0].strip().lower()
    if kind not in ("zsre", "counterfact", "examples", "synthetic"):
        raise DataFormatError(f"data spec {spec!r}: use zsre:PATH or counterfact:PATH")
    return "counterfact" if kind == "counterfact" else "zsre"


def _shuffled_facts(plan: EvaluationPlan) -> list[EditExample]:
    facts = load_examples(plan.eval_data, seed=plan.seed)[plan.eval_offset :]
    random.Random(plan.seed).shuffle(facts)
    return facts


def evaluation_batches(plan: EvaluationPlan) -> list[list[EditExample]]:
    """The stream: the evaluation facts (after `eval_offset`) shuffled with the seed, cut into batches."""
    facts = _shuffled_facts(plan)
    needed = plan.batches * plan.batch_size
    if len(facts) < needed:
        raise DataFormatError(
            f"{plan.eval_data} holds {len(facts)} facts (after the offset {plan.eval_offset}), fewer than {plan.batches} batches of {plan.batch_size}; "
            "lower --batches or --batch-size"
        )
    return [facts[i * plan.batch_size : (i + 1) * plan.batch_size] for i in range(plan.batches)]


def known_fact_pool(plan: EvaluationPlan) -> list[EditExample]:
    """Where known facts are drawn from: `locality.known_facts_data`, else the evaluation facts outside the stream."""
    if plan.locality is not None and plan.locality.known_facts_data:
        return load_examples(plan.locality.known_facts_data, seed=plan.seed)
    return _shuffled_facts(plan)[plan.batches * plan.batch_size :]


def device_description(model: torch.nn.Module) -> str:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _label(spec: MethodSpec, limit: int | None) -> str:
    return f"{spec.name}@K{limit}" if limit is not None and spec.training is not None else spec.name


def run_evaluation(
    plan: EvaluationPlan,
    handle: ModelHandle,
    module_names: list[str],
    *,
    model_name: str = "",
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every method of `plan` and return the report (see `editing.evaluation.report`)."""
    started, wall, cpu = datetime.now(UTC), time.perf_counter(), time.process_time()
    load_start = os.getloadavg()
    kind = data_kind(plan.eval_data)
    batches = evaluation_batches(plan)
    needs_training = any(s.training is not None and s.name not in plan.checkpoints for s in plan.methods)
    train = load_examples(plan.train_data, limit=plan.train_limit, seed=plan.seed) if plan.train_data and needs_training else []
    baseline = measure_baseline(handle.model, handle.tokenizer, batches, kind, plan.eval_batch_size)
    began = time.perf_counter()
    locality, zero = _locality_reference(plan, handle, batches, module_names)
    zero_seconds = time.perf_counter() - began - (locality.seconds if locality else 0.0)
    report: dict[str, Any] = {
        "model": model_name or type(handle.model).__name__,
        "model_fingerprint": handle.fingerprint,
        "device": device_description(handle.model),
        "data_kind": kind,
        "train_data": plan.train_data,
        "eval_data": plan.eval_data,
        "eval_offset": plan.eval_offset,
        "eval_hash": examples_hash([fact for batch in batches for fact in batch]),
        "mode": plan.mode,
        "batch_size": plan.batch_size,
        "batches": plan.batches,
        "seed": plan.seed,
        "edited_modules": module_names,
        "commands": [" ".join(["python -m editing.evaluate", *sys.argv[1:]])] if sys.argv[1:] else [],
        "unedited": {k: round(v, 2) for k, v in pool(baseline.scores).items()} | (locality.unedited() if locality else {}),
        "rows": [],
        "sequences": {},
    }
    if locality is not None:
        report["locality"] = locality.describe() | {"zero_edit_seconds": round(zero_seconds, 1)}
    default = daemon_default_method()
    for spec in plan.methods:
        label = _label(spec, plan.train_limit)
        prepared = prepare(
            spec, handle, module_names, train, seed=plan.seed, checkpoint=plan.checkpoints.get(spec.name),
            editors_dir=plan.editors_dir, progress=progress,
        )
        result = run_stream(
            prepared, handle.model, handle.tokenizer, batches, baseline, kind, mode=plan.mode,
            curve_every=plan.curve_every, eval_batch_size=plan.eval_batch_size, progress=progress, label=label,
            locality=locality,
        )
        row = make_row(label, prepared, result, train_data=plan.train_data, train_limit=plan.train_limit,
                       load_average=os.getloadavg(), daemon_default=label == default, zero_edit=zero,
                       locality=locality is not None)
        report["rows"].append(row)
        report["sequences"][label] = make_sequence(result)
        report["train_data"] = train_data_of(report["rows"])
        report["runs"] = [_run_info(report, started, wall, cpu, load_start)]
        if on_row is not None:
            on_row(report)
    return report


def _locality_reference(
    plan: EvaluationPlan, handle: ModelHandle, batches: list[list[EditExample]], module_names: list[str]
) -> tuple[ModelReference | None, dict[str, float] | None]:
    """The unedited model's locality reference and the zero edit's measures (None, None without `plan.locality`)."""
    if plan.locality is None:
        return None, None
    reference = measure_reference(
        handle.model, handle.tokenizer, batches, known_fact_pool(plan), plan.locality, seed=plan.seed,
        batch_size=plan.eval_batch_size,
    )
    if not plan.locality.null_edit:
        return reference, None
    zero = measure_null_edit(handle.model, handle.tokenizer, batches, data_kind(plan.eval_data), reference,
                             module_names=module_names, eval_batch_size=plan.eval_batch_size)
    return reference, zero


def _run_info(report: dict[str, Any], started: datetime, wall: float, cpu: float, load: tuple[float, ...]) -> dict[str, Any]:
    return {
        "started": started.isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "load_average_start": [round(x, 2) for x in load],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "device": report["device"],
        "commands": report["commands"],
        "methods": [r["method"] for r in report["rows"]],
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    """The libraries whose releases change the numbers (or the fingerprint, in transformers' case)."""
    versions = {"python": platform.python_version(), "editor": code_version()}
    for package in ("torch", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions
