"""Prometheus metrics, defined once on a registry the app owns (no global registry).

With several uvicorn workers (`gateway serve --workers N`) each worker is a process with its own
counters, so the client library's multiprocess mode is used: every worker writes its values to
memory-mapped files in `PROMETHEUS_MULTIPROC_DIR` and whichever worker answers a scrape merges all
of them. Counters and histograms add up; each gauge states how workers combine (`livesum`,
`livemax`, `livemin`: only live workers count). Gauges computed on demand (queue depths, the store's
reachability) are sampled every `SAMPLE_INTERVAL_S` by `refresh()` instead, since a callback runs
only in the process being scraped. The `process_*` metrics describe one process and are left out
in that mode; `gateway_resident_memory_bytes` sums the workers' memory instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

#: model label for requests naming a model that is not served (keeps label cardinality bounded)
UNKNOWN_MODEL = "_unknown"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


BREAKER_CODES = {"closed": 0, "half-open": 1, "open": 2}

#: how often a worker writes its sampled gauges in multiprocess mode (what a scrape may lag by)
SAMPLE_INTERVAL_S = 1.0

def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, when this process runs in it (set before the library loads)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _resident_bytes() -> float:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Metrics:
    """Every metric the gateway exports."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        """Merge every worker's metrics from this directory (None: this process's own, in memory)."""
        self.registry = CollectorRegistry(auto_describe=True)
        if self.multiprocess_dir is None:
            ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        self._samplers: list[tuple[Any, Callable[[], float]]] = []
        self._forgotten: set[tuple[str, str]] = set()
        self.requests = Counter(
            "gateway_requests", "Inference requests by model, attempted version, route, protocol and outcome.",
            ["model", "version", "route", "protocol", "outcome"], registry=self.registry)
        self.latency = Histogram(
            "gateway_request_duration_seconds", "Inference request latency, from body read to answer.",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.rows = Counter(
            "gateway_inference_rows", "Rows answered by a model version.",
            ["model", "version"], registry=self.registry)
        self.validation_failures = Counter(
            "gateway_validation_failures", "Request violations by model and reason (one per violation).",
            ["model", "reason"], registry=self.registry)
        self.ignored_fields = Counter(
            "gateway_ignored_fields", "Unknown request fields ignored under unknown_fields: ignore.",
            ["model"], registry=self.registry)
        self.fallbacks = Counter(
            "gateway_fallbacks",
            "Answers given wholly (or for some rows: low_confidence) by the fallback rules, by reason.",
            ["model", "version", "reason"], registry=self.registry)
        self.breaker_state = Gauge(
            "gateway_breaker_state", "Circuit breaker state per version: 0 closed, 1 half-open, 2 open.",
            ["model", "version"], registry=self.registry, multiprocess_mode="livemax")
        self.breaker_transitions = Counter(
            "gateway_breaker_transitions", "Circuit breaker state changes per version, by new state.",
            ["model", "version", "state"], registry=self.registry)
        self.in_flight = Gauge(
            "gateway_inferences_in_flight", "Model calls running or waiting for a worker thread.",
            registry=self.registry, multiprocess_mode="livesum")
        self.state_store_up = Gauge(
            "gateway_state_store_up",
            "1 when the control-state store can be reached; 0 while a shared store (Redis) is away "
            "(replicas serve their last known state and refuse admin changes).",
            registry=self.registry, multiprocess_mode="livemin")
        self.shadow = Counter(
            "gateway_shadow_requests", "Mirrored requests by outcome (compared, dropped: queue full, failed).",
            ["model", "version", "outcome"], registry=self.registry)
        self.shadow_rows = Counter(
            "gateway_shadow_compared_rows", "Rows compared between the shadow and the primary.",
            ["model", "version"], registry=self.registry)
        self.shadow_disagreements = Counter(
            "gateway_shadow_disagreements", "Rows where the shadow's discrete outputs (labels) differed.",
            ["model", "version"], registry=self.registry)
        self.shadow_score_diff = Histogram(
            "gateway_shadow_score_abs_diff", "Absolute difference of the shadow's score from the primary's.",
            ["model", "version"], buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=self.registry)
        self.alias_changes = Counter(
            "gateway_alias_changes", "Changes of the alias table by action (switch, rollback, canary, ...).",
            ["model", "action"], registry=self.registry)
        self.canary_ratio = Gauge(
            "gateway_canary_ratio", "Share (0-1) of unversioned traffic routed to the canary.",
            ["model"], registry=self.registry, multiprocess_mode="livemax")
        self.rollout_decisions = Counter(
            "gateway_rollout_decisions", "Rollout decisions (advance, extend, promote, rollback, pause, abort).",
            ["model", "decision"], registry=self.registry)
        self.drift_score = Gauge(
            "gateway_drift_score", "Drift score of a feature (or `_score`, the prediction) against the reference.",
            ["model", "version", "feature", "metric"], registry=self.registry, multiprocess_mode="livemax")
        self.drift_state = Gauge(
            "gateway_drift_state", "Drift state per feature: -1 insufficient data, 0 ok, 1 warn, 2 alert.",
            ["model", "version", "feature"], registry=self.registry, multiprocess_mode="livemax")
        self.drift_window_rows = Gauge(
            "gateway_drift_window_rows", "Rows currently in the drift window.", ["model", "version"],
            registry=self.registry, multiprocess_mode="livesum")
        self.drift_dropped = Counter(
            "gateway_drift_dropped_batches", "Batches not folded into drift windows because the queue was full.",
            ["model"], registry=self.registry)
        self.drift_queue_depth = Gauge(
            "gateway_drift_queue_depth", "Batches waiting to be folded into drift windows.",
            registry=self.registry, multiprocess_mode="livesum")
        self.prediction_null_ratio = Gauge(
            "gateway_prediction_null_ratio", "Share of null or NaN prediction scores in the drift window.",
            ["model", "version"], registry=self.registry, multiprocess_mode="livemax")
        self.requests_per_minute = Gauge(
            "gateway_requests_per_minute", "Inference requests in the last full minute.", ["model"],
            registry=self.registry, multiprocess_mode="livesum")
        self.volume_band = Gauge(
            "gateway_volume_band", "The policy's drift.volume band for the model's total traffic, in requests "
            "per minute (bound: min or max); the GatewayVolumeAnomaly alert compares it with the sum of "
            "gateway_requests_per_minute over every replica.", ["model", "bound"], registry=self.registry,
            multiprocess_mode="livemax")
        self.volume_anomaly = Gauge(
            "gateway_volume_anomaly", "1 when this process's last full minute is outside the policy's band "
            "(with several replicas or workers, the alert judges their sum instead).",
            ["model"], registry=self.registry, multiprocess_mode="livemax")
        self.feedback_labels = Counter(
            "gateway_feedback_labels", "Delayed labels joined to a prediction.", ["model", "version"],
            registry=self.registry)
        self.feedback_unshared = Counter(
            "gateway_feedback_unshared_predictions", "Predictions not handed to Redis for labels arriving at "
            "another replica (buffer full, or Redis away): their labels are joined only here.", ["model"],
            registry=self.registry)
        self.feedback_unmatched = Counter(
            "gateway_feedback_unmatched", "Feedback whose request id was unknown or had expired.",
            ["model", "reason"], registry=self.registry)
        self.outcome_metric = Gauge(
            "gateway_outcome_quality", "Online quality from delayed labels (metric: accuracy, auc, brier).",
            ["model", "version", "metric"], registry=self.registry, multiprocess_mode="liveall")
        self.outcome_state = Gauge(
            "gateway_outcome_state", "Outcome state: -1 insufficient labels, 0 ok, 2 alert.", ["model", "version"],
            registry=self.registry, multiprocess_mode="livemax")
        self.shadow_queue_depth = Gauge(
            "gateway_shadow_queue_depth", "Mirrored requests waiting for the shadow.", ["model"],
            registry=self.registry, multiprocess_mode="livesum")
        self.audit_backlog = Gauge(
            "gateway_audit_backlog", "Audit records waiting to be written (the fullest worker's queue).",
            registry=self.registry, multiprocess_mode="livemax")
        self.audit_records = Counter(
            "gateway_audit_records", "Audit records by outcome (written, dropped, rejected).",
            ["outcome"], registry=self.registry)
        self.version_ready = Gauge(
            "gateway_model_version_ready", "1 when a model version is loaded and serving, else 0.",
            ["model", "version"], registry=self.registry, multiprocess_mode="livemin")
        self.model_ready = Gauge(
            "gateway_model_ready", "1 when a model can answer unversioned requests, else 0.",
            ["model"], registry=self.registry, multiprocess_mode="livemin")
        self.policy_problems = Gauge(
            "gateway_policy_problems", "Policy files rejected at the last load.",
            registry=self.registry, multiprocess_mode="livemax")
        self.resident_memory = Gauge(
            "gateway_resident_memory_bytes", "Resident memory of the gateway's worker processes (summed).",
            registry=self.registry, multiprocess_mode="livesum")
        self.sample(self.resident_memory, _resident_bytes)
        self._per_version: tuple[Gauge, ...] = (
            self.breaker_state, self.prediction_null_ratio, self.drift_window_rows, self.outcome_state,
            self.drift_state, self.drift_score, self.outcome_metric)
        """Gauges labelled `model, version, ...` that stop being exported when the version stops serving."""
        # `labels()` hashes and locks on every call; an answer touches three series whose label
        # sets are few (served models x versions x routes x protocols x outcomes), so keep them.
        self._answer_series: dict[tuple[str, str, str, str, str], tuple[Any, Any, Any]] = {}

    def record_answer(self, model: str, version: str, route: str, protocol: str, outcome: str,
                      seconds: float, rows: int) -> None:
        """Count an answered request, observe its latency and count its rows."""
        key = (model, version, route, protocol, outcome)
        series = self._answer_series.get(key)
        if series is None:
            series = self._answer_series[key] = (self.requests.labels(*key), self.latency.labels(model, version),
                                                 self.rows.labels(model, version))
        series[0].inc()
        series[1].observe(seconds)
        series[2].inc(rows)

    def breaker_changed(self, name: str, old: str, new: str) -> None:
        """Listener for breaker transitions (`name` is `model/version`)."""
        model, _, version = name.rpartition("/")
        self.breaker_state.labels(model, version).set(BREAKER_CODES.get(new, -1))
        self.breaker_transitions.labels(model, version, new).inc()

    def sample(self, gauge: Any, value: Callable[[], float]) -> None:
        """Let `gauge` (or a labelled child) report `value()`: read at every scrape in one process, or
        written every `SAMPLE_INTERVAL_S` by `refresh()` in multiprocess mode."""
        if self.multiprocess_dir is None:
            gauge.set_function(value)
        else:
            self._samplers.append((gauge, value))
            with contextlib.suppress(Exception):  # now: a starting worker must not export a made-up 0
                gauge.set(value())

    def refresh(self) -> None:
        """Multiprocess mode: write the sampled gauges, and drop the live gauges of workers that died."""
        self._sample_now()
        if self.multiprocess_dir is not None:
            reap_dead_workers(self.multiprocess_dir)

    def _sample_now(self) -> None:
        for gauge, value in self._samplers:
            with contextlib.suppress(Exception):  # a sampler must never stop the others
                gauge.set(value())

    def serving(self, model: str, version: str) -> None:
        """A version serves (again): export its per-version series."""
        self._forgotten.discard((model, version))

    def forget_version(self, model: str, version: str) -> None:
        """Stop exporting per-version series of a version that no longer serves (no stale alerts)."""
        self._answer_series.clear()
        if self.multiprocess_dir is not None:  # values stay in the files: left out of the exposition instead
            self._forgotten.add((model, version))
            return
        for family in self._per_version:
            for labels in [key for key in list(family._metrics) if key[:2] == (model, version)]:
                family.remove(*labels)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format (in multiprocess mode: every worker's, merged)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        self._sample_now()  # this worker's own samples fresh; the others' at most SAMPLE_INTERVAL_S old
        merged = MultiProcessCollector(None, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        names = frozenset(family._name for family in self._per_version)
        return generate_latest(_Without(merged, names, frozenset(self._forgotten)))


class _Without:
    """A collector's families without the per-version gauge series of versions no longer served."""

    def __init__(self, collector: MultiProcessCollector, families: frozenset[str],
                 forgotten: frozenset[tuple[str, str]]) -> None:
        self._collector = collector
        self._families = families
        self._forgotten = forgotten

    def collect(self) -> Iterator[Metric]:
        families: Iterable[Metric] = self._collector.collect()  # type: ignore[no-untyped-call]
        for family in families:
            if self._forgotten and family.name in self._families:
                family.samples = [s for s in family.samples
                                  if (s.labels.get("model"), s.labels.get("version")) not in self._forgotten]
            yield family


def reap_dead_workers(directory: str) -> None:
    """Remove the live-gauge files of worker processes that no longer run (a worker that crashed
    cannot do it itself; its counters stay, so totals never go down)."""
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith("gauge_live") and entry.name.endswith(".db"):
                with contextlib.suppress(ValueError):
                    pids.add(int(entry.name[:-3].rsplit("_", 1)[1]))
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, another user's
