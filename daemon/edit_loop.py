"""The edit loop: pending facts -> gated EMSEdit batches -> crash-safe commits, plus reverts and probes.

One `EditLoop` is the only writer of the live model in the daemon. Its `tick()` runs as a scheduler
job every `[edit_loop] poll_seconds`; under one lock (`writer`) it

1. carries out reverts filed in the ledger by `python -m daemon.ledger revert` while the daemon runs;
2. runs the baseline probe once, then the periodic probes when due, and follows the drift policy;
3. releases facts held by their source's limits once the source is under them again (`store.trust`);
   then, while at least `min_batch` facts are pending, or the oldest pending one has waited `max_wait_seconds`,
   edits a batch: claim up to `[editor] batch_size` facts (-> editing), propose and gate them on the
   live weights (`editing.gate.batch_edit`), then commit what passed with the model-state protocol
   (artefact durable -> one ledger transaction with the commit row, the fact states and the gate's
   record -> weights published), and settle the rest (rejected, failed, or back to pending to retry,
   each with the `FailureCause` of its try). Facts that missed `min_efficacy` are retried in batches
   of their own, of at most `[gate] retry_batch_size`;
4. consolidates the artefacts (snapshots, retention) between batches.

The gate checks the protected facts of `[ingest] protected_facts` on every try (`editing.gate.protected`):
the file is read again whenever it changes, and a file that can no longer be read keeps the last good
set in force (logged). A fact that changes a protected fact's answer is rejected with the reason.

A stop request abandons the in-flight batch at the gate's next try (the facts go back to pending);
a commit already under way finishes. Reverts from the HTTP API take the same lock (`revert`).

The loop writes what it decides into the service's `ServiceState` (pauses, the gate's drift of the
live version from the base model) and records pauses in the ledger (`store.pauses`), so a pause
outlives a restart until a revert, a resume recorded in the ledger, or a start under other settings
ends it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from itertools import takewhile
from typing import Any

import structlog
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.config import Settings
from daemon.metrics import Metrics
from daemon.model_state import RevertReport, apply_pending_reverts, commit_refs, revert_model
from daemon.publishing import Publisher
from daemon.service_state import (
    BASE_MODEL_DRIFT,
    BatchOutcome,
    BatchPhase,
    GateDrift,
    RevertOutcome,
    ServiceState,
)
from editing.data import EditExample
from editing.engine.checkpoint import code_version
from editing.engine.emsedit import EMSEditor
from editing.gate.batch_edit import BatchResult, EditInterrupted, GatedEditor
from editing.gate.checks import PROTECTED_REASON, BatchChecker, FactOutcome, Gate, GateFact, GateVerdict
from editing.gate.probes import DriftPolicy, ProbeReport, ProbeSuite, probes_due
from editing.gate.protected import ProtectedCheck, ProtectedFact
from editing.gate.specificity import ReferenceStore
from editing.model.loading import LoadedModel
from editing.model.scoring import answer_scores
from editing.state.history import CommitRecord, ModelHistory
from ingest.trust import ProtectedFactsError, load_protected, trust_rules
from store import commits, pauses, queries, trust
from store.errors import StaleVersion
from store.models import Commit, Fact, FactStatus, FailureCause, ProbeKind, ProbeRun
from store.records import CommitIn
from store.states import transition
from store.work import claim_pending, pending_backlog

log = structlog.get_logger(__name__)

PACKAGES = ("torch", "transformers", "safetensors", "sqlalchemy")

#: How `editing.gate.checks` begins the reason of a fact that missed `min_efficacy` ("efficacy 0.5 < ...").
MISSED_EFFICACY = "efficacy "

#: The ledger status of a fact the gate did not commit, by its outcome (others go back to pending).
SETTLED = {"rejected": FactStatus.REJECTED, "failed": FactStatus.FAILED}

#: The gate's figures (`gate_scores`) under the names a commit's edit_metrics has always used for them.
COMMIT_METRIC_NAMES = {
    "efficacy": "efficacy",
    "agreement": "specificity_agreement",
    "mean_kl": "specificity_mean_kl",
    "batch_agreement": "batch_agreement",
    "batch_mean_kl": "batch_mean_kl",
}


def fact_example(fact: Fact) -> EditExample:
    """The editor's view of a ledger fact."""
    locality = tuple((str(pair["prompt"]), str(pair["answer"])) for pair in fact.locality or [])
    return EditExample(
        prompt=fact.prompt,
        target_new=fact.target_new,
        target_true=fact.ground_truth,
        subject=fact.subject,
        rephrase_prompts=tuple(fact.rephrase_prompts or ()),
        locality=locality,
    )


def config_hash(settings: Settings) -> str:
    """sha256 of the settings that shape an edit (model, editor, gate): recorded with every commit."""
    shaping = {
        "model": settings.model.model_dump(mode="json", exclude={"cache_dir"}),
        "editor": settings.editor.model_dump(mode="json", exclude={"checkpoint", "hypernet_device"}),
        "gate": settings.gate.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


@dataclass
class BatchReport:
    """What one batch did (for logs, metrics and tests)."""

    facts: int
    committed: list[int] = field(default_factory=list)
    version: int | None = None
    outcome: BatchOutcome = BatchOutcome.ROLLED_BACK
    seconds: float = 0.0


class EditLoop:
    """The daemon's model writer (see the module docstring). Thread-safe: every entry point takes `writer`."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        history: ModelHistory,
        loaded: LoadedModel,
        references: ReferenceStore,
        metrics: Metrics,
        state: ServiceState,
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.history = history
        self.loaded = loaded
        self.references = references
        self.publisher: Publisher | None = None  # set by the service when [publish] is enabled
        self.metrics = metrics
        self.state = state
        self.stop = stop
        self.writer = threading.RLock()
        self.gated: GatedEditor | None = None
        self.editor_version = code_version()
        self.config_hash = config_hash(settings)
        self.packages = package_versions()
        self.drift = DriftPolicy(settings.gate)
        self._probes: ProbeSuite | None = None
        self._baseline_done = False
        self._commits_since_probe = 0
        self._last_probe_at = time.monotonic()
        self._protected_stamp: tuple[int, int] | None = None
        self._protected: ProtectedCheck | None = None
        self._protected = self._load_protected(strict=True)
        self._after_version_change()
        self.restore_pause()

    # --- set-up ----------------------------------------------------------------------------------

    def attach_editor(self, editor: EMSEditor, checkpoint_id: str) -> None:
        """Start editing with `editor` (the live model's); its statistics follow the recovered version."""
        with self.writer:
            self.history.attach_editor(editor)
            checker = BatchChecker.from_config(self.settings.gate, self.references, self._protected)
            self.gated = GatedEditor(editor, self.history.state, Gate(self.settings.gate), checker)
            self.editor_version = f"{code_version()}+{checkpoint_id}"

    def restore_pause(self) -> None:
        """Start paused when the ledger holds a pause in force: a pause outlives restarts.

        It ends instead when a revert was filed, or carried out on the weights, after it began (the
        operator's answer, perhaps given with the CLI while the daemon was down), or when the settings
        that shape an edit changed since (thresholds loosened, another editor: the operator's other answer).
        """
        with self.sessions.begin() as session:
            pause = pauses.current_pause(session)
            if pause is None:
                return
            revert = pauses.revert_since(session, pause)
            if revert is not None:
                ended_by = f"revert {revert.id}"
            elif pause.config_hash not in (None, self.config_hash):
                ended_by = "a start with other model, editor or gate settings"
            else:
                self.state.pause(pause.reason)
                log.warning("editing paused since before the restart", reason=pause.reason, since=pause.paused_at)
                return
            pauses.record_resume(session=session, resumed_by=ended_by)
        log.info("the pause recorded before the restart has ended", reason=pause.reason, ended_by=ended_by)

    # --- the job ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """One pass of the loop (see the module docstring); the scheduler calls it every poll_seconds."""
        with self.writer:
            self._apply_reverts()
            self._follow_resume()
            if self.gated is None or self.stop.is_set():
                return
            if not self._baseline_done:
                self._baseline_probe()
            while not self.stop.is_set() and not self.state.now().paused and self._batch_due():
                self._apply_reverts()  # a revert filed by the CLI goes before the next batch
                if self.state.now().paused:
                    break
                report = self.run_batch()
                self._after_batch(report)
                if report.version is None:
                    # Nothing committed (rejected, deferred, rolled back): the next pass tries again, so that
                    # facts sent back for a retry do not spin the loop.
                    break

    def _follow_resume(self) -> None:
        """Resume when the ledger no longer holds the pause: an operator ended it from outside (a resume)."""
        if not self.state.now().paused:
            return
        with self.sessions() as session:
            ended = pauses.current_pause(session) is None
        if ended and self.state.resume():
            log.info("editing resumed: the pause was ended in the ledger", version=self.history.state.version)

    def _apply_reverts(self) -> None:
        began = time.perf_counter()
        try:
            applied = apply_pending_reverts(self.history, self.sessions)
        except Exception as exc:  # a failed rebuild must not kill the loop: pause and say why
            log.error("a revert filed in the ledger could not be applied", error=str(exc))
            self.metrics.observe_revert(RevertOutcome.FAILED, time.perf_counter() - began)
            self._pause(f"revert could not be applied: {exc}")
            return
        if applied:
            self.metrics.observe_revert(RevertOutcome.DONE, time.perf_counter() - began)
            self._after_version_change()
            # A revert filed with the CLI is an operator's answer to a pause, as one through the API is.
            self._resume(f"revert {', '.join(map(str, applied))}")

    def _batch_due(self) -> bool:
        """Release what the sources' limits allow now (a commit may have made room), then `_due`."""
        self.release_held()
        return self._due()

    def _due(self) -> bool:
        if not self.settings.edit_loop.enabled:
            return False
        with self.sessions() as session:
            count, oldest = pending_backlog(session)
        if count == 0:
            return False
        if count >= self.settings.edit_loop.min_batch:
            return True
        if oldest is None:
            return False
        oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
        return (datetime.now(UTC) - oldest).total_seconds() >= self.settings.edit_loop.max_wait_seconds

    # --- trust -----------------------------------------------------------------------------------

    def release_held(self) -> dict[str, list[int]]:
        """Release the facts held by a limit whose source is under its limits again (`store.trust.release_held`)."""
        rules = trust_rules(self.settings.ingest, protected=())
        with self.sessions.begin() as session:
            released = trust.release_held(session=session, rules=rules)
        for source, ids in released.items():
            self.metrics.observe_released(source, len(ids))
            log.info("facts released: their source is under its limits again", source=source, facts=len(ids))
        return released

    def _load_protected(self, *, strict: bool = False) -> ProtectedCheck | None:
        """The protected facts of `[ingest] protected_facts`, read when the file changed since the last read.

        `strict` (at construction): a bad file raises ProtectedFactsError, so the daemon does not start
        without its protected facts; otherwise the last good set stays in force and the problem is logged.
        """
        path = self.settings.ingest.protected_facts
        if path is None:
            return None
        try:
            status = path.stat()
        except OSError as exc:
            if strict:
                raise ProtectedFactsError(f"protected facts file {path}: cannot read it: {exc}") from None
            log.error("protected facts file unreadable; the last set read stays in force", path=str(path), error=str(exc))
            return self._protected
        stamp = (status.st_mtime_ns, status.st_size)
        if stamp == self._protected_stamp:
            return self._protected
        try:
            facts = load_protected(path)
        except ProtectedFactsError as exc:
            if strict:
                raise
            log.error("protected facts file invalid; the last set read stays in force", error=str(exc))
            return self._protected
        self._protected_stamp = stamp
        labels = [ProtectedFact(f.prompt, f.answer, f.describe(path)) for f in facts]
        log.info("protected facts read", path=str(path), facts=len(labels))
        return ProtectedCheck(labels, self.settings.gate.batch_size)

    def _refresh_protected(self) -> None:
        self._protected = self._load_protected()
        if self.gated is not None:
            self.gated.checker.protected = self._protected

    def _observe_protected(self, verdict: GateVerdict) -> None:
        if self._protected is None:
            return
        violations = sum(1 for o in verdict.outcomes if o.status == "rejected" and o.reason.startswith(PROTECTED_REASON))
        self.metrics.observe_protected(facts=len(self._protected), checked=verdict.protected_checked, violations=violations)

    # --- one batch -------------------------------------------------------------------------------

    def _gate_fact(self, fact: Fact) -> GateFact:
        """A claimed fact for the gate; one that failed efficacy before gets a stronger edit signal."""
        attempts = max(0, fact.attempts - 1)
        weak = fact.failure_cause is FailureCause.EFFICACY
        strength = self.settings.gate.retry_strength**attempts if weak else 1.0
        return GateFact(fact.id, fact_example(fact), attempts=attempts, strength=strength)

    def _batch_limit(self, session: Session) -> int:
        """How many of the oldest pending facts the next batch claims.

        As many as are alike: facts retried after missing `min_efficacy` go in batches of their own, of at
        most `[gate] retry_batch_size` (a smaller batch edits each of its facts more precisely), the others
        in batches of at most `[editor] batch_size`.
        """
        causes = queries.pending_failure_causes(session, self.settings.editor.batch_size)
        retries = bool(causes) and causes[0] is FailureCause.EFFICACY
        alike = sum(1 for _ in takewhile(lambda cause: (cause is FailureCause.EFFICACY) == retries, causes))
        return max(1, min(alike, self.settings.gate.retry_batch_size) if retries else alike)

    def run_batch(self) -> BatchReport:
        """Claim, edit, gate and commit one batch; the facts end committed, rejected, failed or pending."""
        assert self.gated is not None
        began = time.perf_counter()
        phases: dict[BatchPhase, float] = {}
        with self.sessions.begin() as session:
            claimed = claim_pending(session=session, limit=self._batch_limit(session))
            facts = [self._gate_fact(f) for f in claimed]
        phases[BatchPhase.CLAIM] = time.perf_counter() - began
        report = BatchReport(len(facts))
        if not facts:
            return report
        ids = [int(f.key) for f in facts]
        self._refresh_protected()
        try:
            result = self.gated.edit(facts, should_stop=self.stop.is_set)
        except EditInterrupted:
            self._release(ids, "the daemon stopped while this fact's batch was being edited")
            report.seconds = time.perf_counter() - began
            self.metrics.observe_batch(BatchOutcome.ROLLED_BACK, report.seconds, phases)
            log.info("batch rolled back: stopping", facts=len(ids))
            return report
        except Exception as exc:
            log.exception("edit batch failed", facts=ids)
            self._fail(ids, f"the edit raised {type(exc).__name__}: {exc}")
            report.outcome, report.seconds = BatchOutcome.FAILED, time.perf_counter() - began
            self.metrics.observe_batch(BatchOutcome.FAILED, report.seconds, phases)
            return report
        self._observe_protected(result.verdict)
        phases[BatchPhase.EDIT] = result.edit_seconds
        phases[BatchPhase.GATE] = result.phases.get("check", 0.0)
        commit_began = time.perf_counter()
        version = self._commit(result, facts) if result.prepared is not None else None
        self._settle(result.verdict, committed=version is not None)
        if version is None and result.prepared is not None:
            report.outcome = BatchOutcome.ROLLED_BACK
        elif version is not None:
            phases[BatchPhase.COMMIT] = time.perf_counter() - commit_began
            report.committed = [int(k) for k in result.verdict.committed]
            report.version, report.outcome = version, BatchOutcome.COMMITTED
        else:
            report.outcome = _uncommitted_outcome(result.verdict)
            self._record_gate_run(result.verdict, None)
            if result.verdict.blocked:
                # The live model already fails the specificity thresholds: no batch can pass until an
                # operator reverts (or loosens the thresholds), so stop trying and say why.
                self._pause(f"gate: {result.verdict.blocked}")
        report.seconds = time.perf_counter() - began
        self.metrics.observe_batch(report.outcome, report.seconds, phases)
        log.info(
            "batch done",
            outcome=report.outcome,
            version=version,
            facts=len(ids),
            committed=len(report.committed),
            statuses=_count(o.status for o in result.verdict.outcomes),
            edits=result.verdict.edits,
            seconds=round(report.seconds, 2),
            edit_seconds=round(phases[BatchPhase.EDIT], 2),
            gate_seconds=round(phases[BatchPhase.GATE], 2),
            blocked=result.verdict.blocked,
        )
        return report

    def _commit(self, result: BatchResult, facts: Sequence[GateFact]) -> int | None:
        """The model-state commit protocol for the facts the gate passed; None when the ledger refused."""
        assert result.prepared is not None
        verdict = result.verdict
        committed_ids = [int(k) for k in verdict.committed]
        with self.sessions() as session:
            version = commits.next_version(session)
        parent = self.history.state.version
        scores = gate_scores(verdict)
        metrics = self._edit_metrics(result) | _commit_figures(scores)

        def record(rec: CommitRecord) -> None:
            with self.sessions.begin() as session:
                commits.record_commit(
                    session=session,
                    commit=CommitIn(
                        fact_ids=tuple(committed_ids),
                        gate_verdict="passed" if len(committed_ids) == len(verdict.outcomes) else "partial",
                        edit_metrics=metrics,
                        artefact_path=rec.artefact_path,
                        artefact_sha256=rec.artefact_sha256,
                        weights_sha256=rec.weights_sha256,
                        model_fingerprint=self.loaded.fingerprint,
                        editor_version=self.editor_version,
                        config_hash=self.config_hash,
                        seed=self.settings.editor.seed,
                        package_versions=self.packages,
                    ),
                    expected_version=rec.version,
                    expected_parent=rec.parent,
                )
                commits.record_probe_run(
                    session=session,
                    kind=ProbeKind.GATE,
                    scores=scores,
                    passed=True,
                    commit_version=rec.version,
                    duration_seconds=verdict.seconds,
                    details=verdict.to_dict(),
                )

        try:
            self.history.commit(result.prepared, version=version, record=record)
        except StaleVersion as exc:
            # A revert landed between claim and commit: the edit was made on weights that are no longer
            # current. Nothing was recorded; the facts are tried again on the new version.
            log.warning("commit abandoned: the ledger moved on", error=str(exc), parent=parent)
            self._release(committed_ids, f"not committed: {exc}; retried on the new version")
            return None
        generalization = self._generalization(facts, committed_ids)
        self.metrics.observe_commit(
            version=version,
            facts=len(committed_ids),
            committed_at=datetime.now(UTC),
            efficacy=metrics.get("efficacy"),
            generalization=generalization,
            specificity=metrics.get("specificity_agreement"),
        )
        if generalization is not None:
            with self.sessions.begin() as session:
                row = session.get(Commit, version)
                if row is not None:
                    row.edit_metrics = dict(row.edit_metrics) | {"generalization": generalization}
        return version

    def _edit_metrics(self, result: BatchResult) -> dict[str, float]:
        """What the edit cost and did; the commit records the gate's figures (`gate_scores`) beside them."""
        out: dict[str, float] = {
            "facts": float(len(result.verdict.committed)),
            "batch_facts": float(len(result.verdict.outcomes)),
            "edit_seconds": result.edit_seconds,
            "gate_seconds": result.phases.get("check", 0.0),
            "gate_edits": float(result.verdict.edits),
            "stored_bytes": float(result.prepared.stored_bytes) if result.prepared else 0.0,
        }
        if result.plan is not None and result.plan.steps:
            out["edit_loss_before"] = result.plan.steps[0].edit_loss
            out["edit_loss_last_step"] = result.plan.steps[-1].edit_loss
            out["delta_norm"] = result.plan.total_norm()
        return out

    def _generalization(self, facts: Sequence[GateFact], committed_ids: Sequence[int]) -> float | None:
        """Teacher-forced accuracy of the committed facts' targets on their first paraphrase, on the live model."""
        chosen = set(committed_ids)
        pairs = [
            (o.example.rephrase_prompts[0], o.example.target_new)
            for o in facts
            if int(o.key) in chosen and o.example.rephrase_prompts
        ]
        if not pairs:
            return None
        with self.history.state.reading(), torch.no_grad():
            scores = answer_scores(
                self.loaded.model, self.loaded.tokenizer, [p for p, _ in pairs], [t for _, t in pairs],
                self.settings.gate.batch_size,
            )
        return float(scores.token_accuracy.mean())

    def _settle(self, verdict: GateVerdict, *, committed: bool) -> None:
        """Move every fact the commit did not take to its end state (or back to pending), with its cause."""
        with self.sessions.begin() as session:
            for outcome in verdict.outcomes:
                if outcome.status == "committed" and committed:
                    continue
                fid = int(outcome.key)
                current = session.get(Fact, fid)
                if current is None or current.status != FactStatus.EDITING:
                    continue  # released already (the commit was abandoned)
                reason = outcome.reason + (f" ({_numbers(outcome.numbers)})" if outcome.numbers else "")
                to = SETTLED.get(outcome.status, FactStatus.PENDING)
                cause = failure_cause(outcome)
                transition(session=session, fact_ids=[fid], to=to, error=reason[:2000], failure_cause=cause)

    def _release(self, ids: Sequence[int], reason: str) -> None:
        with self.sessions.begin() as session:
            still = [fid for fid in ids if (row := session.get(Fact, fid)) is not None and row.status == FactStatus.EDITING]
            transition(session=session, fact_ids=still, to=FactStatus.PENDING, error=reason)

    def _fail(self, ids: Sequence[int], reason: str) -> None:
        with self.sessions.begin() as session:
            cause = FailureCause.ERROR
            transition(session=session, fact_ids=list(ids), to=FactStatus.FAILED, error=reason[:2000], failure_cause=cause)

    def _record_gate_run(self, verdict: GateVerdict, version: int | None) -> None:
        with self.sessions.begin() as session:
            commits.record_probe_run(
                session=session,
                kind=ProbeKind.GATE,
                scores=gate_scores(verdict),
                passed=False,
                commit_version=version,
                duration_seconds=verdict.seconds,
                details=verdict.to_dict(),
            )

    def _after_batch(self, report: BatchReport) -> None:
        if report.version is None:
            return
        self._commits_since_probe += 1
        self._after_version_change()
        if probes_due(
            self.settings.gate, self._commits_since_probe, (time.monotonic() - self._last_probe_at) / 60.0
        ):
            self.run_probes(ProbeKind.PERIODIC)
        self._consolidate()

    def _after_version_change(self) -> None:
        """Report the ledger's current version: its commit time, and the gate's drift of it from the base model;
        queue it for publishing (`[publish]`)."""
        if self.publisher is not None:
            self.publisher.version_changed()  # returns at once, never raises
        with self.sessions() as session:
            version = commits.current_version(session)
            last = session.get(Commit, version) if version else None
            scores = queries.commit_gate_scores(session, version) if version else None
        self.metrics.set_model_state(version=version, last_commit_at=last.created_at if last else None)
        self.state.set_drift(_gate_drift(version, scores))

    def _consolidate(self) -> None:
        try:
            with self.sessions() as session:
                refs = commit_refs(session)
            done = self.history.consolidate(refs)
        except Exception as exc:  # storage trouble must not stop editing; the next pass tries again
            log.warning("consolidation failed", error=str(exc))
            return
        if done.snapshot is not None or done.removed_commits:
            log.info(
                "artefacts consolidated",
                snapshot=done.snapshot,
                horizon=done.horizon,
                removed_commits=len(done.removed_commits),
                removed_snapshots=len(done.removed_snapshots),
            )

    # --- probes and drift ------------------------------------------------------------------------

    @property
    def probes(self) -> ProbeSuite:
        if self._probes is None:
            self._probes = ProbeSuite.from_config(self.settings.gate, self.references)
        return self._probes

    def _baseline_probe(self) -> None:
        """Score the base model once (this fills the reference cache, so later runs only read the model)."""
        self._baseline_done = True
        began = time.perf_counter()
        with self.history.state.writing():
            # Computing base references swaps the base weights in for a moment: no query may run meanwhile.
            report = self.probes.run(self.loaded.model, self.loaded.tokenizer)
        self._record_probes(ProbeKind.BASELINE, report, passed=True, reasons=[], seconds=time.perf_counter() - began)

    def run_probes(self, kind: ProbeKind = ProbeKind.PERIODIC) -> ProbeReport:
        """Run the periodic probes on the live model, record them and follow the drift policy."""
        with self.writer:
            began = time.perf_counter()
            with self.history.state.reading():
                report = self.probes.run(self.loaded.model, self.loaded.tokenizer)
            decision = self.drift.decide(report)
            self._commits_since_probe = 0
            self._last_probe_at = time.monotonic()
            self._record_probes(
                kind, report, passed=not decision.drifted, reasons=list(decision.reasons), seconds=time.perf_counter() - began
            )
            if decision.action == "pause":
                self._pause("drift: " + "; ".join(decision.reasons))
            elif decision.action == "revert":
                self._revert_after_drift(decision.reasons)
            return report

    def _record_probes(
        self, kind: ProbeKind, report: ProbeReport, *, passed: bool, reasons: list[str], seconds: float
    ) -> None:
        version = self.history.state.version
        scores = {t.task: t.accuracy for t in report.tasks}
        drift = {t.task: t.accuracy_change for t in report.tasks}
        details = report.to_dict() | {"reasons": reasons, "version": version}
        with self.sessions.begin() as session:
            commits.record_probe_run(
                session=session,
                kind=kind,
                scores=scores,
                passed=passed,
                commit_version=version or None,
                duration_seconds=seconds,
                details=details,
            )
        self.metrics.observe_probes(kind, passed=passed, seconds=seconds, scores=scores, drift=drift)
        log.info(
            "probes run",
            kind=kind,
            version=version,
            passed=passed,
            accuracy=report.accuracy,
            flip_rate=round(report.flip_rate, 4),
            reasons=reasons,
            seconds=round(seconds, 2),
        )

    def _pause(self, reason: str) -> None:
        """Stop editing until an operator acts; recorded in the ledger, so it outlives a restart."""
        with self.sessions.begin() as session:
            pauses.record_pause(
                session=session, reason=reason, version=self.history.state.version, config_hash=self.config_hash
            )
        self.state.pause(reason)
        log.warning("editing paused", reason=reason)

    def _resume(self, resumed_by: str) -> None:
        """Edit again (after a revert); ends the pause in the ledger too."""
        with self.sessions.begin() as session:
            pauses.record_resume(session=session, resumed_by=resumed_by)
        if self.state.resume():
            log.info("editing resumed", version=self.history.state.version, resumed_by=resumed_by)

    def _revert_after_drift(self, reasons: Sequence[str]) -> None:
        with self.sessions() as session:
            run = session.scalars(
                select(ProbeRun)
                .where(ProbeRun.kind.in_((ProbeKind.PERIODIC, ProbeKind.BASELINE)), ProbeRun.passed.is_(True))
                .order_by(ProbeRun.id.desc())
                .limit(1)
            ).first()
            target = (run.commit_version or 0) if run is not None else 0
            active = set(commits.active_versions(session)) | {0}
        if target not in active or target == self.history.state.version:
            self._pause("drift, and no earlier version whose probes passed to revert to: " + "; ".join(reasons))
            return
        try:
            self.revert(to_version=target, last=None, reason="drift: " + "; ".join(reasons), requested_by="daemon:drift")
        except Exception as exc:
            self._pause(f"drift, and the revert to version {target} failed: {exc}")

    # --- reverts from the API --------------------------------------------------------------------

    def revert(self, *, to_version: int | None, last: int | None, reason: str | None, requested_by: str) -> RevertReport:
        """Exact revert of the live model between batches (waits for an in-flight batch to finish)."""
        with self.writer:
            self._apply_reverts()
            began = time.perf_counter()
            try:
                outcome = revert_model(
                    self.history, self.sessions, to_version=to_version, last=last, reason=reason, requested_by=requested_by
                )
            except Exception:
                self.metrics.observe_revert(RevertOutcome.REFUSED, time.perf_counter() - began)
                raise
            self.metrics.observe_revert(RevertOutcome.DONE, outcome.seconds)
            self._after_version_change()
            # A revert is the operator's answer to drift: editing resumes on the restored version.
            self._resume(f"revert {outcome.revert_id}")
            return outcome


def gate_scores(verdict: GateVerdict) -> dict[str, float]:
    """The gate's record of one batch: edits and seconds, and its final try's figures when something committed.

    `efficacy` (mean over the committed facts), `agreement` and `mean_kl` against the frozen base model,
    and `batch_agreement` and `batch_mean_kl` against the model before the batch when that was measured.
    Recorded as the scores of the batch's gate run; a commit records the same figures in its
    edit_metrics (`COMMIT_METRIC_NAMES`), and the live version's `agreement` and `mean_kl` are the
    service's `GateDrift`.
    """
    final = verdict.final
    scores: dict[str, float] = {"edits": float(verdict.edits), "seconds": verdict.seconds}
    if final is not None:
        values = list(final.efficacy.values())
        if values:
            scores["efficacy"] = sum(values) / len(values)
        scores["agreement"] = final.specificity.agreement
        scores["mean_kl"] = final.specificity.mean_kl
        if final.marginal is not None:
            scores["batch_agreement"] = final.marginal.agreement
            scores["batch_mean_kl"] = final.marginal.mean_kl
    return scores


def failure_cause(outcome: FactOutcome) -> FailureCause | None:
    """Which check turned the fact's try down: efficacy when it missed its target, else specificity."""
    if outcome.status == "committed":
        return None
    return FailureCause.EFFICACY if outcome.reason.startswith(MISSED_EFFICACY) else FailureCause.SPECIFICITY


def _uncommitted_outcome(verdict: GateVerdict) -> BatchOutcome:
    """A batch that committed nothing: rejected (a fact harms specificity), failed, or rolled back (all wait)."""
    statuses = {o.status for o in verdict.outcomes}
    if statuses <= {"retry", "deferred"}:
        return BatchOutcome.ROLLED_BACK
    return BatchOutcome.REJECTED if "rejected" in statuses else BatchOutcome.FAILED


def _commit_figures(scores: dict[str, float]) -> dict[str, float]:
    """The gate's figures under a commit's names for them (`COMMIT_METRIC_NAMES`)."""
    return {COMMIT_METRIC_NAMES[k]: v for k, v in scores.items() if k in COMMIT_METRIC_NAMES}


def _gate_drift(version: int, scores: dict[str, Any] | None) -> GateDrift | None:
    """The live version's drift from the base model by its commit's gate run (`gate_scores`)."""
    if version == 0:
        return BASE_MODEL_DRIFT
    if scores is None or "agreement" not in scores or "mean_kl" not in scores:
        return None  # a commit recorded without a gate run (the gate off, or an older daemon)
    return GateDrift(version, float(scores["agreement"]), float(scores["mean_kl"]))


def _numbers(numbers: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return out
