"""Typed configuration section of the commit gate (`editing/` owns the gate's measurements).

Two kinds of check read this section: the per-batch check before every commit (efficacy of each fact,
specificity against the frozen base model, isolation of harmful facts) and the periodic GLUE-style
probes (drift against the base model, and what the daemon does when it is too large).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The GLUE-style tasks scored by default (the sets of the AlphaEdit/RLEdit/EMSEdit side evaluation).
DEFAULT_PROBE_TASKS = ("sst2", "mrpc", "rte", "cola", "nli", "mmlu")
#: Every task `editing.probe_sets` can format (the defaults plus two extra sets of the same origin).
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
    retry_batch_size: int = Field(
        4,
        ge=1,
        le=4096,
        description="Facts that failed efficacy are retried in batches of at most this many.",
    )
    min_agreement: float = Field(
        0.9, ge=0.0, le=1.0, description="Top-1 agreement with the frozen base model on unrelated prompts."
    )
    max_kl: float = Field(
        0.1,
        ge=0.0,
        description="Mean KL(base || edited) of next-token distributions on unrelated prompts (nats).",
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
        description="Largest allowed share of probe items whose prediction differs from the base model's.",
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
