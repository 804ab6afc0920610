"""Fixtures for the tests of the service's outer surfaces: metrics, HTTP API, server, dashboard.

- `fresh_metrics`: `Metrics` on a new `CollectorRegistry`.
- `make_ledger`: a factory of real SQLite ledgers (migrated to head) in a temporary folder.
- `tiny_lm`: `(model, tokenizer)`: a tiny random Llama and a byte-level BPE tokenizer trained locally; no download.
- `RealView`: a `ServiceView` over real parts: `LedgerView` on a real ledger, `answer_query` on a real
  (tiny) model under a lock, reverts through `store.commits`, a real `ServiceState` that the metrics
  watch (as the service wires them). Readiness is a switch; pause it through `view.state`.
- `serve_api`: start `create_app(...)` on a real loopback port; every server is stopped at teardown.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from daemon.api import create_app
from daemon.api_models import EditorStatus, ModelStatus, QueryResult, RevertResult, ServiceStatus
from daemon.config import ApiConfig
from daemon.http_server import HttpServer
from daemon.ledger_view import LedgerView
from daemon.metrics import Metrics
from daemon.querying import answer_query
from daemon.service_state import ServiceState
from daemon.service_view import Conflict, Unavailable
from ingest.config import IngestConfig
from store import commits, work
from store.db import make_engine, make_session_factory, upgrade_to_head
from store.errors import UnknownVersion
from store.records import CommitIn

_CORPUS = (
    "The capital of France is Paris. The capital of Italy is Rome.",
    "The mother tongue of Danielle Darrieux is French. Acme is led by Jane Roe.",
    "The official language of Peru is Spanish. Lionel Messi plays football.",
)


@pytest.fixture
def fresh_metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def _ledger(folder: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{folder / 'ledger.sqlite3'}")
    upgrade_to_head(engine)
    return make_session_factory(engine)


@pytest.fixture
def make_ledger(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], sessionmaker[Session]]:
    return lambda: _ledger(tmp_path_factory.mktemp("ledger"))


@pytest.fixture(scope="session")
def tiny_lm() -> tuple[Any, Any]:
    """A 2-layer Llama (hidden 32) and a 300-token BPE tokenizer; built in about a second."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_CORPUS) * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


class RealView:
    """A ServiceView over a real ledger and a real (tiny) model; thread-safe like the service must be."""

    def __init__(self, sessions: sessionmaker[Session], lm: tuple[Any, Any], metrics: Metrics) -> None:
        self.ledger = LedgerView(sessions, IngestConfig.model_validate({}), metrics)
        self.sessions = sessions
        self.model, self.tokenizer = lm
        self.model_lock = threading.Lock()  # stands in for the service's read/write lock on the weights
        self.not_ready: list[str] = []
        self.state = ServiceState()
        self.started_at = datetime.now(UTC)
        metrics.watch(self.state, self.readiness)

    def readiness(self) -> list[str]:
        reasons = list(self.not_ready)
        problem = self.ledger.reachable()
        if problem:
            reasons.append(problem)
        return reasons

    def pause_reason(self) -> str | None:
        return self.state.now().pause_reason

    def status(self) -> ServiceStatus:
        reasons = self.readiness()
        return ServiceStatus(
            ready=not reasons,
            reasons=reasons,
            paused=self.state.now().paused,
            started_at=self.started_at,
            model=ModelStatus(source="tiny", model_type="llama", fingerprint="0" * 64, device="cpu"),
            editor=EditorStatus(state="ready"),
            ledger=self.ledger.ledger_status(),
        )

    def list_facts(self, **kwargs: Any) -> Any:
        return self.ledger.list_facts(**kwargs)

    def get_fact(self, fact_id: int) -> Any:
        return self.ledger.get_fact(fact_id)

    def submit_facts(self, document: bytes, *, origin: str) -> Any:
        return self.ledger.submit_facts(document, origin=origin)

    def list_commits(self, *, limit: int) -> Any:
        return self.ledger.list_commits(limit=limit)

    def query(self, prompt: str, answers: Sequence[str], max_new_tokens: int) -> QueryResult:
        if "model" in " ".join(self.not_ready):
            raise Unavailable("model: still loading")
        with self.model_lock, self.sessions() as session:
            version = commits.current_version(session)
            return answer_query(
                self.model, self.tokenizer, model_version=version, prompt=prompt, answers=answers,
                max_new_tokens=max_new_tokens,
            )

    def request_revert(self, *, to_version: int | None, last: int | None, reason: str | None, requested_by: str) -> RevertResult:
        try:
            with self.sessions.begin() as session:
                if last is not None:
                    audit = commits.revert_last(session=session, count=last, reason=reason, requested_by=requested_by)
                else:
                    assert to_version is not None
                    audit = commits.revert_to(session=session, to_version=to_version, reason=reason, requested_by=requested_by)
        except UnknownVersion as exc:
            raise Conflict(str(exc)) from None
        return RevertResult(
            revert_id=audit.id, from_version=audit.from_version, to_version=audit.to_version,
            reverted_commits=audit.reverted_commits, reverted_facts=audit.reverted_facts, weights_restored=False,
        )

    def commit_pending(self, limit: int = 100) -> int:
        """Claim pending facts and record them as one commit (the edit loop's ledger side); returns the version."""
        with self.sessions.begin() as session:
            facts = work.claim_pending(session=session, limit=limit)
            commit = commits.record_commit(
                session=session,
                commit=CommitIn(fact_ids=tuple(f.id for f in facts), edit_metrics={"efficacy": 1.0}),
            )
            return commit.version


@pytest.fixture
def serve_api() -> Iterator[Callable[..., HttpServer]]:
    """`serve_api(view, metrics, **api_fields)` starts the app on 127.0.0.1, a free port; stopped at teardown."""
    servers: list[HttpServer] = []

    def start(view: Any, metrics: Metrics, **fields: Any) -> HttpServer:
        config = ApiConfig.model_validate({"port": 0, **fields})
        server = HttpServer(create_app(config, view, metrics), config)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert server.stop(), "server thread did not stop"
