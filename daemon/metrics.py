"""Every Prometheus metric of the daemon, built on an injected `CollectorRegistry`.

The service and the HTTP API call the small typed methods of `Metrics`; no other module imports
prometheus_client. Production passes `prometheus_client.REGISTRY` (or a fresh registry), tests a
fresh `CollectorRegistry`, so two services in one process never clash.

Conventions (https://prometheus.io/docs/practices/naming/): the prefix ``ked_``, base units
(seconds, bytes, ratios in 0..1) as suffixes, ``_total`` on counters, and only bounded label
values: configured source names, fixed outcome and phase sets, probe names from the gate config,
and rejection reason *codes* (`daemon.rejection_codes`), never fact ids, URLs or free text. An
unknown outcome or phase is counted as ``other`` and logged, never raised: a metrics call must not
break the edit loop. docs/monitoring.md lists every series.

The gauges of the service's state (readiness, paused, the editor, the gate's drift from the base
model) are not set by anyone: `ServiceStateCollector` reads them from the `ServiceState` given to
`watch` on each scrape, as `daemon.process_memory` reads the process's memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.config import MetricsConfig
from daemon.process_memory import ProcessMemoryCollector
from daemon.publishing import PublishStats
from daemon.rejection_codes import reason_code
from daemon.service_state import BatchOutcome, BatchPhase, EditorState, RevertOutcome, ServiceState
from store.models import HoldReason, ProbeKind

log = structlog.get_logger(__name__)

BATCH_OUTCOMES: tuple[str, ...] = tuple(BatchOutcome)
BATCH_PHASES: tuple[str, ...] = tuple(BatchPhase)
PROBE_KINDS: tuple[str, ...] = tuple(ProbeKind)
REVERT_OUTCOMES: tuple[str, ...] = tuple(RevertOutcome)
QUALITY_METRICS: tuple[str, ...] = ("efficacy", "generalization", "specificity")
REVIEW_ACTIONS: tuple[str, ...] = ("approved", "rejected")

# Edit batches, probe runs and reverts last from about a second (a small batch on a GPU) to tens of
# minutes (a large batch with bisection on a CPU); the default buckets stop at 10 s.
WORK_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
FETCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _bounded(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value in allowed:
        return value
    log.warning("unknown metric label value counted as 'other'", kind=what, value=value[:80], allowed=list(allowed))
    return "other"


class PublishCollector(Collector):
    """The publisher's counters (`[publish]`), read at scrape time; the target label is the configured name."""

    def __init__(self, stats: Callable[[], PublishStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield CounterMetricFamily("ked_publish_versions", "Versions published for serving engines (reused ones included).", value=s.published)
        yield CounterMetricFamily("ked_publish_reused_versions", "Published versions already on disk (a revert back).", value=s.reused)
        yield CounterMetricFamily("ked_publish_failures", "Versions that could not be written to the publish directory.", value=s.failures)
        yield CounterMetricFamily("ked_publish_skipped_versions", "Versions skipped because a newer one was waiting.", value=s.skipped)
        posts = CounterMetricFamily("ked_publish_posts", "POSTs to serving engines, by configured target name.", labels=["target"])
        failed = CounterMetricFamily("ked_publish_post_failures", "Failed POSTs to serving engines (each try), by target.", labels=["target"])
        for name, n in s.posts.items():
            posts.add_metric([name], n)
        for name, n in s.post_failures.items():
            failed.add_metric([name], n)
        yield posts
        yield failed
        last = -1 if s.last_version is None else s.last_version
        yield GaugeMetricFamily("ked_publish_last_version", "Ledger version published last (-1: none yet).", value=last)
        if s.last_seconds is not None:
            yield GaugeMetricFamily("ked_publish_last_seconds", "Seconds the last publish took to write.", value=s.last_seconds)


class Metrics:
    """The daemon's metrics. Every method is cheap, thread-safe and never raises on odd values."""

    def __init__(self, registry: CollectorRegistry, config: MetricsConfig | None = None) -> None:
        self.registry = registry
        self.config = config or MetricsConfig.model_validate({})
        self._recent: deque[dict[str, float]] = deque(maxlen=self.config.recent_commits)
        self._build_ingest(registry)
        self._build_editing(registry)
        self._build_model(registry)
        self._build_probes(registry)
        self._build_sources(registry)
        self._build_serving(registry)
        self._build_trust(registry)
        self.service_state = ServiceStateCollector()
        registry.register(self.service_state)
        registry.register(ProcessMemoryCollector())

    def watch(self, state: ServiceState, readiness: Callable[[], Sequence[str]]) -> None:
        """Report `state` on every scrape, and `readiness()` (the reasons /readyz gives) as ked_ready."""
        self.service_state.state, self.service_state.readiness = state, readiness

    # --- construction --------------------------------------------------------------------------

    def _build_ingest(self, r: CollectorRegistry) -> None:
        self.facts_ingested = Counter(
            "ked_facts_ingested_total", "New facts stored in the ledger, by source.", ["source"], registry=r
        )
        self.facts_duplicate = Counter(
            "ked_facts_duplicate_total", "Input records that matched a fact already stored, by source.",
            ["source"], registry=r,
        )
        self.facts_rejected = Counter(
            "ked_facts_rejected_total", "Input records rejected at ingest, by source and reason code.",
            ["source", "reason"], registry=r,
        )
        self.facts_pending = Gauge("ked_facts_pending", "Facts waiting to be edited into the model.", registry=r)
        self.facts_by_status = Gauge("ked_facts", "Facts in the ledger, by status.", ["status"], registry=r)

    def _build_editing(self, r: CollectorRegistry) -> None:
        self.batches = Counter("ked_edit_batches_total", "Edit batches, by outcome.", ["outcome"], registry=r)
        self.batch_duration = Histogram(
            "ked_edit_batch_duration_seconds", "Wall time of an edit batch from claim to commit or rollback.",
            ["outcome"], buckets=WORK_BUCKETS, registry=r,
        )
        self.batch_phase_duration = Histogram(
            "ked_edit_batch_phase_duration_seconds", "Wall time of each phase of an edit batch.",
            ["phase"], buckets=WORK_BUCKETS, registry=r,
        )
        self.facts_committed = Counter(
            "ked_facts_committed_total", "Facts applied to the live model by commits.", registry=r
        )
        self.recent_quality = {
            name: Gauge(
                f"ked_recent_commits_{name}_ratio",
                f"Mean {name} (0..1) of the newest commits (metrics.recent_commits of them).",
                registry=r,
            )
            for name in QUALITY_METRICS
        }

    def _build_model(self, r: CollectorRegistry) -> None:
        self.model_version = Gauge("ked_model_version", "Ledger version of the live weights (0 = base).", registry=r)
        self.last_commit_time = Gauge(
            "ked_last_commit_timestamp_seconds", "Unix time of the newest active commit (0 if none).", registry=r
        )
        self.reverts = Counter("ked_reverts_total", "Revert requests, by outcome.", ["outcome"], registry=r)
        self.revert_duration = Histogram(
            "ked_revert_duration_seconds", "Wall time of a revert, weights included.", buckets=WORK_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "ked_model_info", "The loaded model (value 1).", ["model_type", "fingerprint"], registry=r
        )

    def _build_probes(self, r: CollectorRegistry) -> None:
        self.probe_score = Gauge("ked_probe_score_ratio", "Latest score (0..1) of each probe.", ["probe"], registry=r)
        self.probe_drift = Gauge(
            "ked_probe_drift_ratio", "Latest score minus the frozen base model's score, by probe.", ["probe"], registry=r
        )
        self.probe_runs = Counter(
            "ked_probe_runs_total", "Probe runs, by kind and outcome (passed/failed).", ["kind", "outcome"], registry=r
        )
        self.probe_duration = Histogram(
            "ked_probe_duration_seconds", "Wall time of a probe run.", ["kind"], buckets=WORK_BUCKETS, registry=r
        )

    def _build_sources(self, r: CollectorRegistry) -> None:
        self.source_up = Gauge("ked_source_up", "1 when the source's last poll succeeded, else 0.", ["source"], registry=r)
        self.source_failures = Gauge(
            "ked_source_consecutive_failures", "Failed polls since the last success.", ["source"], registry=r
        )
        self.source_polls = Counter(
            "ked_source_polls_total", "Source polls, by outcome (ok/error).", ["source", "outcome"], registry=r
        )
        self.source_fetch = Histogram(
            "ked_source_fetch_duration_seconds", "Wall time of one source poll (fetch and parse).",
            ["source"], buckets=FETCH_BUCKETS, registry=r,
        )

    def _build_serving(self, r: CollectorRegistry) -> None:
        self.http_requests = Counter(
            "ked_http_requests_total", "HTTP requests, by method, route template and status code.",
            ["method", "route", "code"], registry=r,
        )
        self.http_duration = Histogram(
            "ked_http_request_duration_seconds", "Wall time of HTTP requests, by route template.",
            ["route"], buckets=REQUEST_BUCKETS, registry=r,
        )
        self.query_duration = Histogram(
            "ked_query_duration_seconds", "Model time of a /v1/query (generation and answer scoring).",
            buckets=REQUEST_BUCKETS, registry=r,
        )
        self.query_tokens = Counter("ked_query_generated_tokens_total", "Tokens generated by queries.", registry=r)

    def _build_trust(self, r: CollectorRegistry) -> None:
        self.review_queue = Gauge(
            "ked_review_queue_facts", "Facts held (not edited) waiting for review or for their source's limits, by reason.",
            ["reason"], registry=r,
        )
        self.review_oldest_age = Gauge(
            "ked_review_queue_oldest_age_seconds", "How long the longest-held fact has waited (0 when none is held).",
            registry=r,
        )
        self.facts_held = Gauge(
            "ked_source_facts_held", "Held facts by the source they first arrived from and the reason.",
            ["source", "reason"], registry=r,
        )
        self.held_at_intake = Counter(
            "ked_facts_held_total", "New facts stored held instead of pending, by source.", ["source"], registry=r
        )
        self.facts_released = Counter(
            "ked_facts_released_total", "Facts held by a source's limits and released when it was under them again.",
            ["source"], registry=r,
        )
        self.reviews = Counter(
            "ked_reviews_total", "Held facts decided by a reviewer, by action (approved/rejected).", ["action"], registry=r
        )
        self.protected_checks = Counter(
            "ked_protected_fact_checks_total", "Protected facts checked by the gate (each protected fact, each batch).",
            registry=r,
        )
        self.protected_violations = Counter(
            "ked_protected_fact_violations_total", "Facts rejected by the gate for changing a protected fact's answer.",
            registry=r,
        )
        self.protected_facts = Gauge("ked_protected_facts", "Protected facts the gate checks.", registry=r)
        self._trust_sources: tuple[str, ...] = ()
        for action in REVIEW_ACTIONS:  # every series exists from the start, at 0, so dashboards show 0, not "no data"
            self.reviews.labels(action)

    # --- trust --------------------------------------------------------------------------------

    def watch_sources(self, sources: Iterable[str]) -> None:
        """Create the per-source trust series of the configured `sources` at 0 (held, released, held by reason)."""
        self._trust_sources = tuple(sources)
        for source in self._trust_sources:
            self.held_at_intake.labels(source)
            self.facts_released.labels(source)
            for reason in HoldReason:
                self.facts_held.labels(source, reason.value).set(0)

    def set_review_queue(
        self, *, by_reason: Mapping[str, int], by_source: Mapping[str, Mapping[str, int]], oldest_age_seconds: float
    ) -> None:
        """Set the review-queue gauges from the ledger (`store.trust.queue_summary`)."""
        for reason, count in by_reason.items():
            self.review_queue.labels(reason).set(count)
        self.review_oldest_age.set(max(0.0, oldest_age_seconds))
        self.facts_held.clear()
        for source in self._trust_sources:
            for reason in HoldReason:
                self.facts_held.labels(source, reason.value).set(0)
        for source, counts in by_source.items():
            for reason, count in counts.items():
                self.facts_held.labels(source, reason).set(count)

    def observe_held(self, source: str, count: int) -> None:
        """Count `count` new facts of `source` stored held."""
        if count > 0:
            self.held_at_intake.labels(source).inc(count)

    def observe_released(self, source: str, count: int) -> None:
        """Count facts of `source` released from a limit."""
        if count > 0:
            self.facts_released.labels(source).inc(count)

    def observe_review(self, action: str, count: int) -> None:
        """Count `count` held facts approved or rejected."""
        if count > 0:
            self.reviews.labels(_bounded(action, REVIEW_ACTIONS, "review action")).inc(count)

    def observe_protected(self, *, facts: int, checked: int, violations: int) -> None:
        """One batch's protected-fact checks: how many protected facts there are, were checked, were violated."""
        self.protected_facts.set(max(facts, 0))
        self.protected_checks.inc(max(checked, 0))
        self.protected_violations.inc(max(violations, 0))

    # --- ingest -------------------------------------------------------------------------------

    def observe_ingest(
        self, source: str, *, accepted: int, duplicates: int = 0, rejection_reasons: Iterable[str] = ()
    ) -> None:
        """Count one ingest batch of `source`; each rejection reason is reduced to its code."""
        self.facts_ingested.labels(source).inc(max(accepted, 0))
        self.facts_duplicate.labels(source).inc(max(duplicates, 0))
        for reason in rejection_reasons:
            self.facts_rejected.labels(source, reason_code(reason)).inc()

    def set_fact_counts(self, by_status: Mapping[str, int]) -> None:
        """Set the fact gauges from the ledger's counts by status (``pending`` feeds ked_facts_pending)."""
        for status, count in by_status.items():
            self.facts_by_status.labels(status).set(count)
        self.facts_pending.set(by_status.get("pending", 0))

    # --- editing ------------------------------------------------------------------------------

    def observe_batch(self, outcome: BatchOutcome, seconds: float, phases: Mapping[BatchPhase, float]) -> None:
        """Count one finished edit batch, its total wall time and the time of each phase it went through."""
        label = _bounded(outcome, BATCH_OUTCOMES, "batch outcome")
        self.batches.labels(label).inc()
        self.batch_duration.labels(label).observe(max(seconds, 0.0))
        for phase, phase_seconds in phases.items():
            self.batch_phase_duration.labels(_bounded(phase, BATCH_PHASES, "batch phase")).observe(max(phase_seconds, 0.0))

    def observe_commit(
        self,
        *,
        version: int,
        facts: int,
        committed_at: datetime,
        efficacy: float | None = None,
        generalization: float | None = None,
        specificity: float | None = None,
    ) -> None:
        """Record a commit: version, time, facts committed and its quality (ratios in 0..1, None if not measured)."""
        self.facts_committed.inc(max(facts, 0))
        self.model_version.set(version)
        self.last_commit_time.set(committed_at.timestamp())
        quality = {"efficacy": efficacy, "generalization": generalization, "specificity": specificity}
        self._recent.append({k: float(v) for k, v in quality.items() if v is not None})
        for name, gauge in self.recent_quality.items():
            values = [entry[name] for entry in self._recent if name in entry]
            if values:
                gauge.set(sum(values) / len(values))

    def set_model_state(self, *, version: int, last_commit_at: datetime | None) -> None:
        """Set the model version and last commit time directly (start-up, after a revert)."""
        self.model_version.set(version)
        self.last_commit_time.set(last_commit_at.timestamp() if last_commit_at else 0)

    def observe_revert(self, outcome: RevertOutcome, seconds: float) -> None:
        """Count one revert request and, when it ran, its wall time."""
        self.reverts.labels(_bounded(outcome, REVERT_OUTCOMES, "revert outcome")).inc()
        if outcome == RevertOutcome.DONE:
            self.revert_duration.observe(max(seconds, 0.0))

    def watch_publisher(self, stats: Callable[[], PublishStats]) -> None:
        """Expose the publisher's counters (`ked_publish_*`) from now on."""
        self.registry.register(PublishCollector(stats))

    def set_model_info(self, *, model_type: str, fingerprint: str) -> None:
        """Describe the loaded model (fingerprint shortened to 16 characters)."""
        self.model_info.clear()
        self.model_info.labels(model_type, fingerprint[:16]).set(1)

    # --- probes -------------------------------------------------------------------------------

    def observe_probes(
        self,
        kind: ProbeKind,
        *,
        passed: bool,
        seconds: float,
        scores: Mapping[str, float],
        drift: Mapping[str, float] | None = None,
    ) -> None:
        """Record a probe run: scores by probe (0..1) and drift (score minus the base model's score)."""
        label = _bounded(kind, PROBE_KINDS, "probe kind")
        self.probe_runs.labels(label, "passed" if passed else "failed").inc()
        self.probe_duration.labels(label).observe(max(seconds, 0.0))
        for probe, score in scores.items():
            self.probe_score.labels(probe).set(score)
        for probe, value in (drift or {}).items():
            self.probe_drift.labels(probe).set(value)

    # --- sources ------------------------------------------------------------------------------

    def observe_source_poll(self, source: str, *, ok: bool, seconds: float, consecutive_failures: int = 0) -> None:
        """Record one poll of `source`: its outcome, duration and the health that follows from it."""
        self.source_polls.labels(source, "ok" if ok else "error").inc()
        self.source_fetch.labels(source).observe(max(seconds, 0.0))
        self.set_source_health(source, up=ok, consecutive_failures=0 if ok else consecutive_failures)

    def set_source_health(self, source: str, *, up: bool, consecutive_failures: int) -> None:
        """Set a source's health gauges (start-up: from the ledger's source rows)."""
        self.source_up.labels(source).set(1 if up else 0)
        self.source_failures.labels(source).set(consecutive_failures)

    # --- serving ------------------------------------------------------------------------------

    def observe_http_request(self, *, method: str, route: str, code: int, seconds: float) -> None:
        """Count one HTTP request; `route` is the route template (``/v1/facts/{fact_id}``), never the raw path."""
        self.http_requests.labels(method, route, str(code)).inc()
        self.http_duration.labels(route).observe(max(seconds, 0.0))

    def observe_query(self, *, seconds: float, generated_tokens: int) -> None:
        """Record the model time of one query and the tokens it generated."""
        self.query_duration.observe(max(seconds, 0.0))
        self.query_tokens.inc(max(generated_tokens, 0))

    # --- exposition ---------------------------------------------------------------------------

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) of a scrape: OpenMetrics when `accept` asks for it, else the text format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


#: Name and help of each gauge `ServiceStateCollector` reports.
STATE_GAUGES: dict[str, str] = {
    "ked_ready": "1 when /readyz answers 200, else 0.",
    "ked_editing_paused": "1 while editing is paused (drift policy, a gate that finds the live model beyond its "
    "budget, or a failed revert), else 0. Queries are still answered.",
    "ked_editor_state": "1 for the editor's current state, 0 for others.",
    "ked_editor_training_progress_ratio": "Share of the editor's training steps done (0..1).",
    "ked_editor_training_step": "Training steps done.",
    "ked_editor_training_loss": "Latest training loss of the editor.",
    "ked_gate_base_agreement_ratio": "Top-1 agreement of the live model with the frozen base model on the gate's "
    "prompts, as the gate measured it for the commit that made the live version (1 for the base model).",
    "ked_gate_base_mean_kl_nats": "Mean KL(base || live) of next-token distributions on the gate's prompts, as the "
    "gate measured it for the commit that made the live version (0 for the base model).",
}


def _gauge(name: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, STATE_GAUGES[name])
    if value is not None:  # a value not known yet is left out rather than reported as 0
        family.add_metric([], value)
    return family


class ServiceStateCollector(Collector):
    """The gauges of the service's state, read from `state` (and `readiness()`) on every scrape.

    Until `Metrics.watch` gives it the service's state it reports a fresh `ServiceState` and "not ready".
    """

    def __init__(self) -> None:
        self.state = ServiceState()
        self.readiness: Callable[[], Sequence[str]] | None = None

    def collect(self) -> Iterator[Metric]:
        now = self.state.now()
        yield _gauge("ked_ready", float(self.readiness is not None and not self.readiness()))
        yield _gauge("ked_editing_paused", float(now.paused))
        editor = GaugeMetricFamily("ked_editor_state", STATE_GAUGES["ked_editor_state"], labels=["state"])
        for state in EditorState:
            editor.add_metric([state.value], float(state is now.editor))
        yield editor
        training = now.training
        yield _gauge("ked_editor_training_progress_ratio", now.training_ratio)
        yield _gauge("ked_editor_training_step", training.step if training else 0)
        yield _gauge("ked_editor_training_loss", training.loss if training and training.loss is not None else 0)
        drift = now.drift
        yield _gauge("ked_gate_base_agreement_ratio", drift.agreement if drift else None)
        yield _gauge("ked_gate_base_mean_kl_nats", drift.mean_kl if drift else None)

    def describe(self) -> Iterator[Metric]:
        # Described without collecting, so registering never runs the readiness check.
        for name, help_text in STATE_GAUGES.items():
            yield GaugeMetricFamily(name, help_text)
