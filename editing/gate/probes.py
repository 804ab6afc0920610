"""Periodic GLUE-style probes of the live model and its drift from the frozen base model.

- The probe sets come from `editing.gate.probe_sets` (a directory in the format of `shared/data/glue_probes`
  or a Hugging Face dataset id). Each item is a few-shot prompt scored by answer likelihood: the choice
  with the highest teacher-forced log-likelihood is the prediction (`choice_scores`).
- `ProbeSuite.run` compares the live model with the base model: accuracy change and the share of items
  whose prediction flipped. Base predictions come from a `ReferenceStore` (computed once per base
  fingerprint and probe set). Without probe data, the standing prompts serve, with the base model's
  next-token distributions as reference (agreement plays the role of accuracy).
- `DriftPolicy.decide` turns a report into an action (continue, pause, revert); `probes_due` says when
  the next run is due. Every report is JSON-serialisable (`to_dict`) for the ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from editing.errors import DataFormatError, ProbeDataError
from editing.gate.config import GateConfig
from editing.gate.probe_sets import ProbeTask, load_probe_tasks
from editing.gate.specificity import ReferenceStore, SpecificityCheck, standing_prompts
from editing.model.scoring import answer_scores, next_token_logprobs
from editing.model.tokenise import encode_answer


def choice_scores(model: nn.Module, tokenizer: Any, task: ProbeTask, batch_size: int) -> torch.Tensor:
    """(N, C) log-likelihood of every choice of every item.

    When every choice is one token, one pass per item gives all of them, and the few-shot prefix is
    run once for the whole task (`PrefixCache`); otherwise each (prompt, choice) row is teacher-forced.
    """
    n_choices = {len(item.choices) for item in task.items}
    try:
        ids = [[encode_answer(tokenizer, c, item.prompt) for c in item.choices] for item in task.items]
    except DataFormatError as exc:
        raise ProbeDataError(f"task {task.name}: {exc}") from None
    if len(n_choices) == 1 and all(len(t) == 1 for row in ids for t in row):
        questions = [item.prompt for item in task.items]
        logprobs = next_token_logprobs(model, tokenizer, questions, batch_size, prefix=task.prefix())
        return logprobs.gather(1, torch.tensor([[t[0] for t in row] for row in ids]))
    prompts = task.prompts()
    flat_prompts = [p for p, item in zip(prompts, task.items, strict=True) for _ in item.choices]
    flat_answers = [c for item in task.items for c in item.choices]
    loglik = answer_scores(model, tokenizer, flat_prompts, flat_answers, batch_size).log_likelihood
    out = torch.full((len(task.items), max(n_choices)), float("-inf"))
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
        return cls(tasks, references, standing=() if tasks else standing_prompts(), batch_size=config.batch_size)

    def _task_report(self, model: nn.Module, tokenizer: Any, task: ProbeTask) -> TaskReport:
        def compute(m: nn.Module) -> dict[str, torch.Tensor]:
            return {"scores": choice_scores(m, tokenizer, task, self.batch_size)}

        base = self.references.get(model, f"probe-{task.name}", task.set_hash(), compute, persist=True)["scores"]
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
        """One line per threshold the report passes (empty: no drift).

        Labelled tasks are held to `max_accuracy_drop` and `max_flip_rate` (pooled over them). The
        standing prompts (no gold answers) measure what the gate's cumulative budget bounds, agreement
        and KL with the base model's next-token distributions, so they are held to that budget
        (`min_agreement`, `max_kl`), measured here on every standing prompt rather than a batch's sample.
        """
        out = []
        change = report.accuracy_change
        if change is not None and -change > self.config.max_accuracy_drop:
            out.append(
                f"probe accuracy {report.accuracy:.3f} is {-change:.3f} below the base model's "
                f"{report.base_accuracy:.3f} (max_accuracy_drop {self.config.max_accuracy_drop})"
            )
        labelled = [t for t in report.tasks if t.labelled]
        items = sum(t.n_items for t in labelled)
        flip = sum(t.flip_rate * t.n_items for t in labelled) / items if items else 0.0
        if flip > self.config.max_flip_rate:
            out.append(f"prediction flip rate {flip:.3f} > max_flip_rate {self.config.max_flip_rate}")
        for task in report.tasks:
            if task.labelled:
                continue
            if task.accuracy < self.config.min_agreement:
                out.append(
                    f"{task.task} prompts: agreement with the base model {task.accuracy:.3f} < min_agreement "
                    f"{self.config.min_agreement}"
                )
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
        config.probe_every_minutes > 0 and commits_since_last > 0 and minutes_since_last >= config.probe_every_minutes
    )
    return by_count or by_time
