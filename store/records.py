"""Plain records exchanged with the ledger: validated input facts, their origins, rejections and results.

These are frozen dataclasses with no SQLAlchemy in them, so `ingest/` and `daemon/` can build and
compare them without a database. Validation of the raw input happens in `ingest/`; the ledger only
normalises (see `store.normalise`) and deduplicates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Locality:
    """An unrelated prompt and its expected answer, checked for specificity after an edit."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class FactIn:
    """A validated fact; `ingest/` has already stripped and checked the fields."""

    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[Locality, ...] = ()
    external_id: str | None = None  #: the record's own "id" field, if any
    observed_at: datetime | None = None  #: timezone-aware UTC


@dataclass(frozen=True)
class Origin:
    """Where an input record came from."""

    source: str  #: configured source name ("inbox", "cli", "feed:reuters", ...)
    location: str  #: file path or URL
    position: str | None = None  #: "line 12", a feed entry id / guid, or "item 3" in a JSON array


@dataclass(frozen=True)
class RejectionIn:
    """An input record that never became a fact."""

    origin: Origin
    excerpt: str  #: at most ~500 characters of the raw input, safely decoded
    reason: str  #: precise: field and problem, e.g. "target_new: must not be empty"


@dataclass(frozen=True)
class AddResult:
    """What `store.intake.add_facts` did with a batch of records."""

    accepted: int  #: new facts stored
    duplicates: int  #: records that matched an existing fact (provenance still recorded)
    superseded: int  #: older pending facts superseded by a newer target for the same prompt
    fact_ids: tuple[int, ...]  #: ids of the facts the records map to, in input order
    held: int = 0  #: new facts stored held (review, protected, conflict, a source's limits; store.trust)


@dataclass(frozen=True)
class CommitIn:
    """Everything the edit loop records about one committed edit (see `store.intake.record_commit`).

    `fact_ids` must all be in state `editing`. The remaining fields describe the edit so that a later
    revert can be checked (weights hash) and a run reproduced (fingerprint, versions, seed).
    """

    fact_ids: tuple[int, ...]
    gate_verdict: str = "passed"
    edit_metrics: Mapping[str, float] = field(default_factory=dict)
    probe_scores: Mapping[str, float] = field(default_factory=dict)
    artefact_path: str | None = None
    artefact_sha256: str | None = None
    weights_sha256: str | None = None  #: hash of the edited weights after this commit
    model_fingerprint: str | None = None
    editor_version: str | None = None
    config_hash: str | None = None
    seed: int | None = None
    package_versions: Mapping[str, str] = field(default_factory=dict)
