"""Request and response bodies of the HTTP API (pydantic), with examples for the OpenAPI schema.

The service returns these models through `daemon.service_view.ServiceView`; `daemon.ledger_view`
builds the ledger-backed ones from `store.queries` results. Field constraints here are the API's
contract: the OpenAPI schema is generated from them and tested against the running app.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from daemon.service_state import EditorState
from store.models import FactStatus, FailureCause, HoldReason

MAX_PROMPT_CHARS = 1000  # at most 4000 byte-level tokens: within any supported model's context
MAX_ANSWER_CHARS = 500
MAX_ANSWERS = 16
MAX_NEW_TOKENS = 256
MAX_REASON_CHARS = 1000
MAX_VERSION = 2**53 - 1  # the largest integer every JSON client represents exactly
# At least one character that is not whitespace; U+001C..U+001F are spelled out because Python's
# str.strip() removes them while the regular-expression engines do not count them as whitespace.
NON_BLANK = r"[^\s\x1c-\x1f]"

EXAMPLE_FACT: dict[str, Any] = {
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompts": ["Danielle Darrieux's native language is"],
    "locality": [{"prompt": "The capital of France is", "answer": "Paris"}],
    "id": "dd-1",
    "observed_at": "2026-11-21T10:00:00Z",
}


#: A fact's `failure_cause` (`store.models.FailureCause`), stored with its `last_error`.
LastFailureCause = Annotated[
    FailureCause | None,
    Field(description="Which check turned the fact's last try down: efficacy, specificity or error; null if none did."),
]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class ErrorBody(_Out):
    """Every error answer: what went wrong and what to do."""

    detail: str | list[Any] = Field(description="A message, or FastAPI's list of validation errors (422).")


class Health(_Out):
    status: Literal["ok"] = "ok"


class Readiness(_Out):
    """Whether the service can edit and answer; `reasons` lists what is missing when it cannot.

    A paused daemon stays ready (it still answers queries, takes facts and reverts): the pause is
    reported in `editing_paused` and `pause_reason`, not as a reason.
    """

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra={
            "examples": [
                {"ready": False, "reasons": ["editor: training (42%)"], "editing_paused": False, "pause_reason": None}
            ]
        },
    )

    ready: bool
    reasons: list[str] = Field(description="Empty when ready.")
    editing_paused: bool = Field(description="True while editing is paused; queries, facts and reverts go on.")
    pause_reason: str | None = Field(None, description="Why editing is paused: drift, a blocked gate, a failed revert.")


class FactSummary(_Out):
    """One fact in a listing."""

    id: int
    status: FactStatus
    prompt: str
    target_new: str
    source: str = Field(description="The source it first arrived from.")
    attempts: int
    commit_version: int | None
    received_at: datetime
    failure_cause: LastFailureCause
    hold_reason: str | None = Field(None, description="Why it is held, while it is (docs/trust.md).")


class FactList(_Out):
    facts: list[FactSummary]


class Locality(_Out):
    prompt: str
    answer: str


class FactOrigin(_Out):
    """One arrival of a fact."""

    source: str
    location: str
    position: str | None
    external_id: str | None
    observed_at: datetime | None
    received_at: datetime


class ReviewRecord(_Out):
    """One decision on a held fact (the review audit trail)."""

    action: str = Field(description="approved, rejected, or released (by the daemon: its source is under its limits).")
    reviewer: str
    reason: str | None
    hold_reason: str | None = Field(description="Why the fact had been held.")
    decided_at: datetime


class FactDetail(_Out):
    """One fact with its whole history."""

    id: int
    status: FactStatus
    prompt: str
    target_new: str
    subject: str | None
    ground_truth: str | None
    rephrase_prompts: list[str]
    locality: list[Locality]
    content_hash: str
    attempts: int
    last_error: str | None
    failure_cause: LastFailureCause
    received_at: datetime
    status_changed_at: datetime
    observed_at: datetime | None
    external_id: str | None
    supersedes: int | None
    superseded_by: int | None
    commit_version: int | None
    commit_history: list[int] = Field(description="Every commit that applied it, oldest first.")
    origins: list[FactOrigin] = Field(description="Every arrival, oldest first.")
    hold_reason: str | None = Field(None, description="Why it is held (review, protected, conflict, rate_limit, pending_limit).")
    reviews: list[ReviewRecord] = Field(default_factory=list, description="Every approval, rejection or release, oldest first.")


class FactsSubmission(BaseModel):
    """Facts in the ingest format (docs/ingest.md), as the JSON document ``{"facts": [...]}``.

    Each item is validated by ingest, exactly as from the drop folder: an item that is not a valid
    fact becomes a recorded rejection with its reason, listed in the answer, and does not fail the
    request. The benchmark shapes (CounterFact, ZsRE, ROME) are accepted too.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"facts": [EXAMPLE_FACT]}]})

    facts: list[dict[str, Any]] = Field(min_length=1, description="Fact records in the ingest format.")


class RecordOrigin(_Out):
    source: str
    location: str
    position: str | None = Field(description='"item 3": the third record of `facts` (counted from 1).')


class RecordRejection(_Out):
    origin: RecordOrigin
    reason: str = Field(description="Field and problem, e.g. 'target_new: must not be empty or whitespace'.")
    code: str = Field(description="The reason's bounded code, as in the metric label (docs/monitoring.md).")


class SubmitSummary(_Out):
    """What ingest did with the submitted records."""

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra={
            "examples": [{"accepted": 1, "duplicates": 0, "superseded": 0, "rejected": 0, "fact_ids": [17], "rejections": []}]
        },
    )

    accepted: int = Field(ge=0, description="New facts stored (pending).")
    duplicates: int = Field(ge=0, description="Records matching a fact already stored (provenance recorded).")
    superseded: int = Field(ge=0, description="Older pending facts replaced by a newer target for the same prompt.")
    held: int = Field(
        0, ge=0, description="Of the new facts, those waiting for review or for the source's limits (docs/trust.md)."
    )
    rejected: int = Field(ge=0, description="Records that did not become facts; see `rejections`.")
    fact_ids: list[int] = Field(description="Ids of the facts the accepted and duplicate records map to, in order.")
    rejections: list[RecordRejection]


class CommitOut(_Out):
    """One commit of the ledger."""

    version: int
    parent_version: int
    created_at: datetime
    fact_count: int
    gate_verdict: str
    reverted_by: int | None = Field(description="Id of the revert that undid this commit, if any.")
    edit_metrics: dict[str, Any]
    probe_scores: dict[str, Any]
    weights_sha256: str | None
    model_fingerprint: str | None
    editor_version: str | None
    fact_ids: list[int]


class CommitList(_Out):
    commits: list[CommitOut] = Field(description="Newest first; reverted commits included.")


class SourceStatus(_Out):
    name: str
    kind: str
    healthy: bool
    consecutive_failures: int
    last_error: str | None
    last_success_at: datetime | None
    last_polled_at: datetime | None


class LedgerStatus(_Out):
    model_version: int = Field(description="Version of the newest active commit (0 = the base model).")
    facts: dict[str, int] = Field(description="Facts by status, every status included.")
    rejections: int
    last_commit: CommitOut | None
    sources: list[SourceStatus]


class ModelStatus(_Out):
    source: str
    model_type: str
    fingerprint: str
    device: str


class EditorStatus(_Out):
    state: EditorState
    training_progress: float | None = Field(None, ge=0, le=1, description="Share of training done, while training.")
    detail: str | None = None


class ServiceStatus(_Out):
    """The daemon at a glance."""

    ready: bool
    reasons: list[str]
    paused: bool
    pause_reason: str | None = Field(None, description="Why editing is paused, while it is (as in /readyz).")
    started_at: datetime
    model: ModelStatus | None = Field(description="None while the model loads.")
    editor: EditorStatus
    ledger: LedgerStatus


Answer = Annotated[str, Field(min_length=1, max_length=MAX_ANSWER_CHARS, pattern=NON_BLANK)]


class QueryRequest(BaseModel):
    """A prompt for the live edited model, and optionally answers to score."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "The mother tongue of Danielle Darrieux is", "answers": ["English", "French"], "max_new_tokens": 8}
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=NON_BLANK)
    answers: list[Answer] = Field(
        default_factory=list,
        max_length=MAX_ANSWERS,
        description="Answers whose probability after the prompt is wanted (scored as ' ' + answer).",
    )
    max_new_tokens: int = Field(16, ge=0, le=MAX_NEW_TOKENS, description="Tokens to generate greedily (0: none).")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        # The pattern admits characters Python counts as whitespace (U+001C..U+001F); the tokenizer strips them.
        if not value.strip():
            raise ValueError("must hold a character that is not whitespace")
        return value

    @field_validator("answers")
    @classmethod
    def _answers_not_blank(cls, values: list[str]) -> list[str]:
        for i, value in enumerate(values):
            if not value.strip():
                raise ValueError(f"answer {i} must hold a character that is not whitespace")
        return values


class AnswerProbability(_Out):
    answer: str
    probability: float = Field(ge=0, le=1, description="p(' ' + answer | prompt), teacher-forced over its tokens.")
    log_probability: float = Field(le=0)
    tokens: int = Field(ge=1, description="Tokens in the answer.")


class QueryResult(_Out):
    """The live model's answer; every number comes from one consistent version of the weights."""

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "model_version": 3,
                    "completion": " English, and she",
                    "generated_tokens": 4,
                    "answers": [{"answer": "English", "probability": 0.91, "log_probability": -0.094, "tokens": 1}],
                }
            ]
        },
    )

    model_version: int = Field(ge=0)
    completion: str
    generated_tokens: int = Field(ge=0)
    answers: list[AnswerProbability]


class RevertTo(BaseModel):
    """Return to a version: every active commit above it is reverted."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"to_version": 2, "reason": "bad batch from feed X"}]}
    )

    to_version: int = Field(ge=0, le=MAX_VERSION, description="Version to return to (0: the base model).")
    reason: str | None = Field(None, max_length=MAX_REASON_CHARS, description="Kept in the audit trail.")


class RevertLast(BaseModel):
    """Revert the newest `last` active commits."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"last": 1, "reason": "wrong CEO fact from feed"}]}
    )

    last: int = Field(ge=1, le=MAX_VERSION, description="How many of the newest active commits to revert.")
    reason: str | None = Field(None, max_length=MAX_REASON_CHARS, description="Kept in the audit trail.")


class RevertResult(_Out):
    revert_id: int
    from_version: int
    to_version: int
    reverted_commits: int
    reverted_facts: int
    weights_restored: bool = Field(description="True once the live weights equal the target version's.")


# --- the review queue (docs/trust.md) ------------------------------------------------------------------


class ReviewFilterIn(BaseModel):
    """Which held facts a bulk decision means; every given field must match, at least one must be given."""

    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[int, Field(ge=1, le=2**53 - 1)]] | None = Field(None, min_length=1, max_length=10_000)
    source: str | None = Field(None, min_length=1, max_length=200, description="Arrived from this source, e.g. feed:wire.")
    origin: str | None = Field(None, min_length=1, max_length=4096, description="Arrived from this file path or URL.")
    held_for: HoldReason | None = Field(None, description="Held for this reason.")
    prompt_contains: str | None = Field(None, min_length=1, max_length=2000, description="Prompt contains this text (any case).")


class Decision(BaseModel):
    """Why, and who decides (recorded as `api:<reviewer>`; without one, `api:<client address>`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "checked the filing", "reviewer": "alice"}]})

    reason: str | None = Field(None, max_length=2000)
    reviewer: str | None = Field(None, min_length=1, max_length=100, pattern=NON_BLANK)


class BulkDecision(Decision):
    """A decision on every held fact the filter matches."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"filter": {"source": "feed:wire"}, "reason": "trusted feed", "reviewer": "alice"}]},
    )

    filter: ReviewFilterIn


class HeldFactOut(_Out):
    """A fact waiting in the review queue."""

    id: int
    prompt: str
    target_new: str = Field(description="The proposed answer.")
    ground_truth: str | None
    model_answer: str | None = Field(description="The live model's current greedy answer (when asked for with answers=true).")
    source: str
    location: str
    position: str | None
    hold_reason: str
    note: str | None = Field(description="The hold reason in words.")
    received_at: datetime
    held_since: datetime


class QueueSummaryOut(_Out):
    held: int
    by_reason: dict[str, int]
    by_source: dict[str, dict[str, int]]
    oldest_held_since: datetime | None


class ReviewQueue(_Out):
    held: list[HeldFactOut] = Field(description="Oldest first.")
    queue: QueueSummaryOut
    answers_missing: str | None = Field(None, description="Why model answers are missing, when they were asked for.")


class ReviewResult(_Out):
    """What a decision did."""

    action: str = Field(description="approved or rejected")
    decided: list[int] = Field(description="The facts this request moved.")
    skipped: list[int] = Field(description="Facts another reviewer decided between the lookup and the update.")
    superseded: list[int] = Field(description="Pending facts of the same prompts an approval superseded.")
