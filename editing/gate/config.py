"""Typed configuration section of the commit gate (`editing/` owns the gate's measurements).

Two kinds of check read this section: the per-batch check before every commit (efficacy of each fact,
specificity, isolation of harmful facts) and the periodic GLUE-style probes (drift against the base
model, and what the daemon does when it is too large).

Specificity has two budgets. The per-batch one (`min_batch_agreement`, `max_batch_kl`) bounds what a
single batch changes on unrelated prompts, measured against the model before the batch, so one harmful
fact is caught however far earlier edits have moved the model. The cumulative one (`min_agreement`,
`max_kl`) bounds the distance of the edited model from the frozen base; once the model has used it up,
the gate blocks and the drift policy decides (pause, or revert).

Defaults, from the measured edits of the default editor on SmolLM2 (docs/gate.md, "Defaults"): one
batch of 16 held-out ZsRE facts changes 22 to 34 % of the unrelated prompts' top-1 tokens at a mean KL
of 0.47 to 0.83 nats, so the per-batch budget (agreement 0.6, KL 1.0) passes a typical batch and
catches the outliers; the cumulative budget (agreement 0.5, KL 2.0) keeps at least half of the
unrelated next-token predictions, which that editor reaches after about three batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The GLUE-style tasks scored by default (the sets of the AlphaEdit/RLEdit/EMSEdit side evaluation).
DEFAULT_PROBE_TASKS = ("sst2", "mrpc", "rte", "cola", "nli", "mmlu")
#: Every task `editing.gate.probe_sets` can format (the defaults plus two extra sets of the same origin).
KNOWN_PROBE_TASKS = (*DEFAULT_PROBE_TASKS, "sentiment_analysis", "dialogue")


class GateConfig(BaseModel):
    """The commit gate: per-batch checks and periodic probes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Gate every commit. Turning it off commits every edit unchecked.")

    # --- per-batch checks -----------------------------------------------------------------------
    min_efficacy: float = Field(
        0.9, ge=0.0, le=1.0, description="Teacher-forced accuracy a fact's target must reach on its prompt."
    )
    efficacy_retries: int = Field(
        2,
        ge=0,
        le=20,
        description="How many more times a fact failing efficacy is tried before it is marked failed.",
    )
    retry_strength: float = Field(
        2.0,
        ge=1.0,
        le=100.0,
        description="A fact retried after failing efficacy is edited with its edit signal (the weight of its "
        "loss) multiplied by this, once per failed try; the gate checks the stronger edit like any other.",
    )
    retry_batch_size: int = Field(
        4,
        ge=1,
        le=4096,
        description="Facts that missed min_efficacy are retried in batches of their own, of at most this many "
        "(other facts go in batches of [editor] batch_size).",
    )
    min_batch_agreement: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="What one batch may change: top-1 agreement on unrelated prompts with the model before the "
        "batch (while the edited model is this close to the frozen base, the base stands in and the model before "
        "the batch is not measured).",
    )
    max_batch_kl: float = Field(
        1.0,
        ge=0.0,
        description="What one batch may change: mean KL(before || after) of next-token distributions on unrelated "
        "prompts, against the model before the batch (nats; the base stands in as for min_batch_agreement).",
    )
    min_agreement: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="The budget of all edits together: top-1 agreement with the frozen base model on unrelated "
        "prompts. When the model before a batch is already below it, editing is blocked (the drift policy's "
        "business). The periodic probes hold the standing prompts to it too.",
    )
    max_kl: float = Field(
        2.0,
        ge=0.0,
        description="The budget of all edits together: mean KL(base || edited) of next-token distributions on "
        "unrelated prompts (nats); blocks editing like min_agreement.",
    )
    specificity_prompts: int = Field(
        16,
        ge=0,
        le=4096,
        description="Standing prompts checked per batch, besides locality prompts (0: locality only).",
    )
    use_locality_prompts: bool = Field(
        True, description="Also check the locality prompts that come with the batch's facts."
    )
    isolate_harmful: bool = Field(
        True,
        description="When a batch fails specificity, find the harmful facts by bisection so the others still "
        "commit; off sends the whole batch back.",
    )
    max_isolation_edits: int = Field(
        48, ge=1, le=10000, description="Most re-edits one batch may spend on isolation and re-checks."
    )
    batch_size: int = Field(16, ge=1, le=1024, description="Prompts per forward pass when the gate scores the model.")
    frozen_layer_cache_tokens: int = Field(
        16384,
        ge=0,
        le=10_000_000,
        description="Tokens whose hidden states below the lowest edited layer the gate keeps (those layers "
        "never change, so a check runs only the layers from the first edited one; 0: run every layer).",
    )

    # --- periodic probes --------------------------------------------------------------------------
    probe_data: Path | None = Field(
        None,
        description="Directory of GLUE-style probe sets (JSON lists named <task>.json). Empty (and no "
        "`probe_dataset`) means the standing prompts shipped with the project.",
    )
    probe_dataset: str | None = Field(
        None,
        description="Hugging Face dataset id to load the probe tasks from (one configuration per task; needs "
        "the `datasets` package). Used only when `probe_data` is empty.",
    )
    probe_split: str = Field("validation", description="Split of `probe_dataset` to use.")
    probe_tasks: list[str] = Field(
        list(DEFAULT_PROBE_TASKS),
        min_length=1,
        description="Probe tasks to score: sst2, mrpc, rte, cola, nli, mmlu, sentiment_analysis, dialogue.",
    )
    probe_items: int = Field(32, ge=1, le=100000, description="Items scored per task (drawn once, with `probe_seed`).")
    few_shot: int = Field(2, ge=0, le=16, description="Solved examples put before each probe question.")
    probe_seed: int = Field(0, description="Seed for drawing probe items and few-shot examples.")
    probe_every_commits: int = Field(
        32, ge=0, le=1_000_000, description="Run the probes after this many commits (0: never by count)."
    )
    probe_every_minutes: float = Field(
        60.0,
        ge=0.0,
        description="Run the probes when this many minutes have passed since the last run and something was "
        "committed since (0: never by time).",
    )
    max_accuracy_drop: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Largest allowed drop of pooled probe accuracy below the base model's.",
    )
    max_flip_rate: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Largest allowed share of labelled probe items whose prediction differs from the base "
        "model's (the standing prompts, used without probe data, are held to min_agreement and max_kl instead).",
    )
    drift_policy: Literal["pause", "revert"] = Field(
        "pause",
        description="What the daemon does when drift passes a threshold: 'pause' editing, or 'revert' to the "
        "last version whose probes passed.",
    )

    @field_validator("probe_tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in KNOWN_PROBE_TASKS]
        if unknown:
            raise ValueError(f"unknown probe task(s) {unknown}; known: {', '.join(KNOWN_PROBE_TASKS)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError("probe tasks must not repeat")
        return tasks
