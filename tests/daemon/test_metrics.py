"""`daemon.metrics`: names by Prometheus conventions, bounded labels, the values the service sets."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import MetricsConfig
from daemon.metrics import WORK_BUCKETS, Metrics
from daemon.process_memory import resident_bytes
from daemon.rejection_codes import REASON_CODES, reason_code
from daemon.service_state import EditorState, GateDrift, ServiceState
from ingest.config import IngestConfig
from ingest.documents import read_document
from ingest.facts import to_outcomes
from store.records import RejectionIn

UNITS = ("_seconds", "_bytes", "_ratio", "_timestamp_seconds")


def families(metrics: Metrics) -> dict[str, str]:
    """name -> type of every family the registry exposes."""
    text = metrics.exposition()[0].decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_names_follow_prometheus_conventions(fresh_metrics: Metrics) -> None:
    found = families(fresh_metrics)
    assert len(found) >= 30
    for name, kind in found.items():
        assert name.startswith("ked_"), name
        if kind == "counter":  # the parser strips _total from counter family names
            assert not name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        if name.endswith("_ratio"):
            assert kind == "gauge", name
    exposed = fresh_metrics.exposition()[0].decode()
    assert "ked_facts_ingested_total" in exposed or "# TYPE ked_facts_ingested_total counter" in exposed
    for line in exposed.splitlines():
        if line.startswith("# TYPE") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total"), line


def test_histograms_cover_seconds_to_minutes() -> None:
    assert WORK_BUCKETS[0] <= 0.5
    assert WORK_BUCKETS[-1] >= 30 * 60
    assert list(WORK_BUCKETS) == sorted(WORK_BUCKETS)


def test_batches_commits_and_phases(fresh_metrics: Metrics) -> None:
    fresh_metrics.observe_batch("committed", 95.0, {"edit": 60.0, "gate": 30.0})
    fresh_metrics.observe_batch("rejected", 1500.0, {"edit": 1000.0, "restore": 2.0})
    fresh_metrics.observe_batch("exploded", 1.0, {"warp": 1.0})  # type: ignore[arg-type,dict-item]
    assert value(fresh_metrics, "ked_edit_batches_total", outcome="committed") == 1
    assert value(fresh_metrics, "ked_edit_batches_total", outcome="other") == 1
    assert value(fresh_metrics, "ked_edit_batch_duration_seconds_bucket", outcome="committed", le="60.0") == 0
    assert value(fresh_metrics, "ked_edit_batch_duration_seconds_bucket", outcome="committed", le="120.0") == 1
    assert value(fresh_metrics, "ked_edit_batch_duration_seconds_bucket", outcome="rejected", le="1800.0") == 1
    assert value(fresh_metrics, "ked_edit_batch_phase_duration_seconds_sum", phase="edit") == 1060.0
    assert value(fresh_metrics, "ked_edit_batch_phase_duration_seconds_count", phase="other") == 1

    when = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    fresh_metrics.observe_commit(version=4, facts=16, committed_at=when, efficacy=1.0, specificity=0.9)
    assert value(fresh_metrics, "ked_facts_committed_total") == 16
    assert value(fresh_metrics, "ked_model_version") == 4
    assert value(fresh_metrics, "ked_last_commit_timestamp_seconds") == when.timestamp()
    fresh_metrics.set_model_state(version=0, last_commit_at=None)
    assert value(fresh_metrics, "ked_model_version") == 0
    assert value(fresh_metrics, "ked_last_commit_timestamp_seconds") == 0


def test_recent_commit_quality_is_a_mean_over_the_window() -> None:
    metrics = Metrics(CollectorRegistry(), MetricsConfig(enabled=True, recent_commits=2))
    when = datetime.now(UTC)
    metrics.observe_commit(version=1, facts=1, committed_at=when, efficacy=0.2, generalization=0.5)
    metrics.observe_commit(version=2, facts=1, committed_at=when, efficacy=0.6)
    assert value(metrics, "ked_recent_commits_efficacy_ratio") == pytest.approx(0.4)
    assert value(metrics, "ked_recent_commits_generalization_ratio") == pytest.approx(0.5)  # not measured in v2
    metrics.observe_commit(version=3, facts=1, committed_at=when, efficacy=1.0)
    assert value(metrics, "ked_recent_commits_efficacy_ratio") == pytest.approx(0.8)  # v1 left the window
    assert value(metrics, "ked_recent_commits_specificity_ratio") == 0  # never measured


def test_ingest_counts_by_source_and_reason_code(fresh_metrics: Metrics) -> None:
    fresh_metrics.observe_ingest(
        "inbox",
        accepted=3,
        duplicates=2,
        rejection_reasons=["target_new: must not be empty or whitespace", "prompt: required", "prompt: required"],
    )
    fresh_metrics.set_fact_counts({"pending": 7, "committed": 2})
    assert value(fresh_metrics, "ked_facts_ingested_total", source="inbox") == 3
    assert value(fresh_metrics, "ked_facts_duplicate_total", source="inbox") == 2
    assert value(fresh_metrics, "ked_facts_rejected_total", source="inbox", reason="missing_field") == 2
    assert value(fresh_metrics, "ked_facts_rejected_total", source="inbox", reason="empty_text") == 1
    assert value(fresh_metrics, "ked_facts_pending") == 7
    assert value(fresh_metrics, "ked_facts", status="committed") == 2


BAD_RECORDS = b"\n".join(
    [
        b'{"prompt": "p", "target_new": ""}',
        b'{"prompt": "p"}',
        b'{"prompt": "p", "target_new": "t", "colour": "red"}',
        b'{"prompt": "p", "target_new": 42}',
        b'{"prompt": "p", "target_new": "' + b"x" * 600 + b'"}',
        b'{"prompt": "p\\u0007", "target_new": "t"}',
        b'{"prompt": "p", "target_new": "t", "observed_at": "yesterday"}',
        b'{"prompt": "p", "target_new": "t", "observed_at": "2026-01-01T10:00:00"}',
        b'{"prompt": "p", "target_new": "Paris", "ground_truth": "paris"}',
        b'{"prompt": "p", "target_new": "t", "rephrase_prompts": "r"}',
        b'{"prompt": "p", "target_new": "t"',
        b'{"prompt": "p", "target_new": "t", "id": true}',
        b"[1, 2]",
        b'{"prompt": NaN, "target_new": "t"}',
        b'\xff{"prompt": "p"}',
        b'{"src": "q"}',
    ]
)


def test_every_real_ingest_rejection_maps_to_a_specific_code() -> None:
    limits = IngestConfig.model_validate({}).limits
    outcomes = to_outcomes(read_document(BAD_RECORDS, name="bad.jsonl", limits=limits), source="t", location="bad.jsonl", limits=limits)
    rejections = [o for o in outcomes if isinstance(o, RejectionIn)]
    assert len(rejections) == len(BAD_RECORDS.splitlines())
    codes = {r.reason: reason_code(r.reason) for r in rejections}
    assert "other" not in codes.values(), codes
    assert len(set(codes.values())) >= 9
    assert set(codes.values()) <= set(REASON_CODES)


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("input: cannot read: connection refused", "unreadable_input"),
        ("file: file is larger than 1024 bytes (ingest.limits.max_file_bytes)", "too_large"),
        ("file: not valid gzip data: bad header", "bad_compression"),
        ("feed: malformed XML: mismatched tag", "bad_feed"),
        ("file: contains no records", "no_records"),
        ("something nobody anticipated", "other"),
    ],
)
def test_reason_codes_of_document_level_problems(reason: str, code: str) -> None:
    assert reason_code(reason) == code


def test_sources_probes_editor_and_reverts(fresh_metrics: Metrics) -> None:
    fresh_metrics.observe_source_poll("feed", ok=False, seconds=2.0, consecutive_failures=3)
    assert value(fresh_metrics, "ked_source_up", source="feed") == 0
    assert value(fresh_metrics, "ked_source_consecutive_failures", source="feed") == 3
    fresh_metrics.observe_source_poll("feed", ok=True, seconds=0.2)
    assert value(fresh_metrics, "ked_source_up", source="feed") == 1
    assert value(fresh_metrics, "ked_source_consecutive_failures", source="feed") == 0
    assert value(fresh_metrics, "ked_source_polls_total", source="feed", outcome="error") == 1
    assert value(fresh_metrics, "ked_source_fetch_duration_seconds_count", source="feed") == 2

    fresh_metrics.observe_probes("periodic", passed=False, seconds=40.0, scores={"sst2": 0.7}, drift={"sst2": -0.12})
    assert value(fresh_metrics, "ked_probe_score_ratio", probe="sst2") == 0.7
    assert value(fresh_metrics, "ked_probe_drift_ratio", probe="sst2") == -0.12
    assert value(fresh_metrics, "ked_probe_runs_total", kind="periodic", outcome="failed") == 1

    state = ServiceState()
    fresh_metrics.watch(state, list)
    state.set_editor(EditorState.TRAINING)
    state.observe_training(step=250, total=1000, loss=1.5)
    states = {s: value(fresh_metrics, "ked_editor_state", state=s) for s in ("missing", "training", "ready", "failed")}
    assert states == {"missing": 0, "training": 1, "ready": 0, "failed": 0}
    assert value(fresh_metrics, "ked_editor_training_progress_ratio") == 0.25
    state.set_editor(EditorState.READY)
    assert value(fresh_metrics, "ked_editor_state", state="training") == 0
    assert value(fresh_metrics, "ked_editor_training_progress_ratio") == 1

    fresh_metrics.observe_revert("refused", 0.0)
    fresh_metrics.observe_revert("done", 3.0)
    assert value(fresh_metrics, "ked_reverts_total", outcome="refused") == 1
    assert value(fresh_metrics, "ked_revert_duration_seconds_count") == 1


def test_the_service_state_is_read_at_scrape_time(fresh_metrics: Metrics) -> None:
    assert value(fresh_metrics, "ked_ready") == 0  # nothing watched yet: not ready
    assert value(fresh_metrics, "ked_editor_state", state="missing") == 1
    state, reasons = ServiceState(), ["model: loading"]
    fresh_metrics.watch(state, lambda: reasons)
    assert value(fresh_metrics, "ked_ready") == 0
    reasons.clear()
    assert value(fresh_metrics, "ked_ready") == 1
    assert value(fresh_metrics, "ked_editing_paused") == 0
    state.pause("drift: flip rate 0.3 > 0.2")
    assert value(fresh_metrics, "ked_editing_paused") == 1
    assert value(fresh_metrics, "ked_ready") == 1  # paused editing is no readiness problem
    state.resume()
    assert value(fresh_metrics, "ked_editing_paused") == 0


def test_the_gate_drift_of_the_live_version_is_exported_once_known(fresh_metrics: Metrics) -> None:
    state = ServiceState()
    fresh_metrics.watch(state, list)
    assert value(fresh_metrics, "ked_gate_base_agreement_ratio") is None  # not known: no sample, not 0
    state.set_drift(GateDrift(version=3, agreement=0.625, mean_kl=1.97))
    assert value(fresh_metrics, "ked_gate_base_agreement_ratio") == 0.625
    assert value(fresh_metrics, "ked_gate_base_mean_kl_nats") == 1.97
    assert families(fresh_metrics)["ked_gate_base_mean_kl_nats"] == "gauge"


def test_process_memory_is_read_at_scrape_time(fresh_metrics: Metrics) -> None:
    rss = value(fresh_metrics, "ked_process_resident_memory_bytes")
    assert rss is not None and rss > 10 * 1024 * 1024
    assert abs(rss - resident_bytes()) < 64 * 1024 * 1024
    peak = value(fresh_metrics, "ked_process_peak_resident_memory_bytes")
    assert peak is not None and peak >= rss * 0.9
    statm = Path("/proc/self/statm")
    if statm.exists():
        pages = int(statm.read_text().split()[1])
        assert abs(resident_bytes() - pages * os.sysconf("SC_PAGE_SIZE")) < 16 * 1024 * 1024


def test_each_registry_holds_one_metrics_object() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    Metrics(CollectorRegistry())  # another registry: no clash
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry)


def test_exposition_negotiates_openmetrics(fresh_metrics: Metrics) -> None:
    body, content_type = fresh_metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    body, content_type = fresh_metrics.exposition(None)
    assert content_type.startswith("text/plain")


def test_trust_review_queue_limits_and_protected_facts(fresh_metrics: Metrics) -> None:
    def value(name: str, **labels: str) -> float | None:
        return fresh_metrics.registry.get_sample_value(name, labels)

    fresh_metrics.set_review_queue(
        by_reason={"review": 4, "rate_limit": 0}, by_source={"feed:wire": {"review": 4}}, oldest_age_seconds=90.0
    )
    assert value("ked_review_queue_facts", reason="review") == 4
    assert value("ked_review_queue_oldest_age_seconds") == 90.0
    assert value("ked_source_facts_held", source="feed:wire", reason="review") == 4
    fresh_metrics.set_review_queue(by_reason={"review": 0}, by_source={}, oldest_age_seconds=-5.0)
    assert value("ked_source_facts_held", source="feed:wire", reason="review") is None  # a drained source goes
    assert value("ked_review_queue_oldest_age_seconds") == 0.0
    fresh_metrics.observe_held("feed:wire", 3)
    fresh_metrics.observe_released("jsonl:bulk", 2)
    fresh_metrics.observe_review("approved", 5)
    fresh_metrics.observe_review("bogus", 1)
    fresh_metrics.observe_protected(facts=7, checked=7, violations=1)
    assert value("ked_facts_held_total", source="feed:wire") == 3
    assert value("ked_facts_released_total", source="jsonl:bulk") == 2
    assert value("ked_reviews_total", action="approved") == 5 and value("ked_reviews_total", action="other") == 1
    assert (value("ked_protected_facts"), value("ked_protected_fact_checks_total")) == (7, 7)
    assert value("ked_protected_fact_violations_total") == 1


def test_the_trust_series_of_configured_sources_exist_at_zero_before_anything_is_held(fresh_metrics: Metrics) -> None:
    def value(name: str, **labels: str) -> float | None:
        return fresh_metrics.registry.get_sample_value(name, labels)

    assert value("ked_reviews_total", action="approved") == 0 and value("ked_reviews_total", action="rejected") == 0
    fresh_metrics.watch_sources(["inbox", "feed:wire"])
    for source in ("inbox", "feed:wire"):
        assert value("ked_facts_held_total", source=source) == 0
        assert value("ked_facts_released_total", source=source) == 0
        assert value("ked_source_facts_held", source=source, reason="review") == 0
    fresh_metrics.set_review_queue(by_reason={"review": 2}, by_source={"feed:wire": {"review": 2}}, oldest_age_seconds=1.0)
    assert value("ked_source_facts_held", source="feed:wire", reason="review") == 2
    assert value("ked_source_facts_held", source="inbox", reason="review") == 0, "a configured source with nothing held reads 0"
