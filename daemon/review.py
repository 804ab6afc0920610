"""The review queue for people: held facts beside the model's current answer, and decisions on them.

`python -m daemon.ledger review|approve|reject` and the API's review routes (`GET /v1/review`,
`POST /v1/facts/{id}/approve|reject`, `POST /v1/review/approve|reject`) both come here; the ledger
work is `store.trust`'s. The model's current answer to a held fact's prompt is the live model's
greedy completion of `ANSWER_TOKENS` tokens: the API asks its own service for it, the command line
asks the running daemon through `POST /v1/query` (`answers_from_daemon`), so that no command loads a
second copy of the model beside the daemon's. Without a daemon answering, the answers are left out
and the listing says why (docs/trust.md).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from sqlalchemy.orm import Session, sessionmaker

from daemon.config import ApiConfig
from daemon.metrics import Metrics
from daemon.service_view import Conflict, NotFound, ViewError
from store import trust
from store.errors import LedgerError, UnknownFact, UnknownSource
from store.trust import HeldFact, NothingMatched, NotWaiting, ReviewFilter, ReviewOutcome

#: Tokens of the model's greedy answer shown beside a held fact's proposed target.
ANSWER_TOKENS = 12
#: Seconds the command line waits for the daemon's answer to one prompt.
ANSWER_TIMEOUT_SECONDS = 20.0

Action = Literal["approve", "reject"]
#: Answers a prompt with the live model's greedy completion (raises when the model cannot answer now).
Answerer = Callable[[str], str]


@dataclass(frozen=True)
class ReviewItem:
    """A held fact and, when asked for and available, the model's current answer to its prompt."""

    fact: HeldFact
    model_answer: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self.fact) | {"model_answer": self.model_answer}


def with_answers(facts: Sequence[HeldFact], answer: Answerer) -> tuple[list[ReviewItem], str | None]:
    """The facts with the model's answer to each prompt (each prompt asked once), and why answers are missing."""
    answers: dict[str, str] = {}
    for prompt in dict.fromkeys(f.prompt for f in facts):
        try:
            answers[prompt] = answer(prompt)
        except Exception as exc:  # the listing stays useful without the model; it says why
            return [ReviewItem(f) for f in facts], f"no model answers: {exc}"
    return [ReviewItem(f, answers.get(f.prompt)) for f in facts], None


def daemon_url(api: ApiConfig) -> str:
    """Where the running daemon's API answers on this machine (an any-address bind is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(api.host, api.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{api.port}"


def answers_from_daemon(api: ApiConfig, timeout: float = ANSWER_TIMEOUT_SECONDS) -> Answerer:
    """An `Answerer` that asks the running daemon (`POST /v1/query`, with the read or write token when set)."""
    url = daemon_url(api) + "/v1/query"
    token = api.read_token or api.token

    def answer(prompt: str) -> str:
        body = json.dumps({"prompt": prompt, "max_new_tokens": ANSWER_TOKENS}).encode()
        request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return str(json.loads(response.read())["completion"]).strip()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"the daemon at {url} answered {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RuntimeError(f"the daemon's API at {url} does not answer ({reason}); is the daemon running?") from None

    return answer


class ReviewDesk:
    """The review queue for the API: listing (with the model's answers) and decisions, one transaction each."""

    def __init__(self, sessions: sessionmaker[Session], answer: Answerer | None = None, metrics: Metrics | None = None) -> None:
        self.sessions = sessions
        self.answer = answer
        self.metrics = metrics

    def queue(
        self, selection: ReviewFilter, *, limit: int, answers: bool
    ) -> tuple[list[ReviewItem], trust.QueueSummary, str | None]:
        """Held facts matching `selection` (oldest first), the queue's summary, and why answers are missing."""
        with self.sessions() as session:
            try:
                facts = trust.held_facts(session, selection, limit=limit)
            except UnknownSource as exc:
                raise NotFound(str(exc)) from None
            summary = trust.queue_summary(session)
        if not answers:
            return [ReviewItem(f) for f in facts], summary, None
        if self.answer is None:
            return [ReviewItem(f) for f in facts], summary, "no model answers: the model is not available here"
        items, problem = with_answers(facts, self.answer)
        return items, summary, problem

    def decide(self, action: Action, selection: ReviewFilter, *, reviewer: str, reason: str | None) -> ReviewOutcome:
        """Approve or reject; NotFound for unknown ids, sources or a filter matching nothing, Conflict for a fact
        that is not waiting."""
        decide = trust.approve if action == "approve" else trust.reject
        try:
            with self.sessions.begin() as session:
                outcome = decide(session=session, selection=selection, reviewer=reviewer, reason=reason)
        except (UnknownFact, UnknownSource, NothingMatched) as exc:
            raise NotFound(str(exc)) from None
        except NotWaiting as exc:
            raise Conflict(str(exc)) from None
        except LedgerError as exc:
            raise _Refused(str(exc)) from None
        if self.metrics is not None:
            self.metrics.observe_review(outcome.action, len(outcome.decided))
        return outcome


class _Refused(ViewError):
    status_code = 422
