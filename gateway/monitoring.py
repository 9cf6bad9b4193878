"""Monitoring side path: drift windows, request volume, feedback joins; reports at a cadence.

The request path only calls `observe` (a dict of column references and a non-blocking put on a
bounded per-model queue) and `count`. A worker per model folds batches into the drift windows;
a refresher looks twice a second and recomputes each version's report once it is older than
`drift.score_every_s`, updating the Prometheus gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.drift import SCORE, STATE_CODES, VersionDrift
from gateway.feedback import FeedbackStore
from gateway.feedback_shared import SharedPredictions
from gateway.policy import Drift, Feedback, Policy
from gateway.registry import ServedModel, ServedVersion, Snapshot
from gateway.telemetry import Metrics
from gateway.validation import ValidatedBatch

log = logging.getLogger("gateway.monitoring")
FOLD_BATCH = 512  # queued batches folded per numpy pass
FOLD_DELAY_S = 0.1  # longer gathers, fewer numpy passes; drift windows lag by at most this


@dataclass(frozen=True)
class _Job:
    version: str
    feeds: dict[str, np.ndarray]
    """The validated model feeds; drift columns are taken from them when folding, many jobs at once."""
    sources: dict[str, str]
    """Monitored feature -> the feed that holds it."""
    scores: np.ndarray | None


class Monitoring:
    """Drift, volume and outcome monitoring for every model."""

    def __init__(self, snapshot: Callable[[], Snapshot], metrics: Metrics,
                 clock: Callable[[], float] = time.time, judge_volume: bool = True) -> None:
        self._judge_volume = judge_volume
        """False when this process serves a share of the model's traffic (replicas or workers sharing
        state): its own count says nothing about the model's band, which the alert judges on the sum."""
        self._snapshot = snapshot
        self._metrics = metrics
        self._clock = clock
        self._queues: dict[str, asyncio.Queue[_Job]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._windows: dict[tuple[str, str], tuple[Drift, VersionDrift]] = {}
        self._reports: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._minutes: dict[str, tuple[int, int, int]] = {}  # model -> (minute, count, previous count)
        self.feedback = FeedbackStore()
        self.shared: SharedPredictions | None = None
        """With shared state: predictions also go to Redis, for labels that reach another process."""
        self._sources: dict[tuple[str, str], tuple[object, dict[str, str]]] = {}  # -> (policy, feature -> feed)
        self.dropped: dict[str, int] = {}
        self._first_full_minute = int(clock() // 60) + 1  # the minute we started in was only partly seen
        metrics.sample(metrics.drift_queue_depth, lambda: sum(q.qsize() for q in self._queues.values()))

    # --- request path ------------------------------------------------------------------------

    def count(self, model: str) -> None:
        """Count one request towards the per-minute volume."""
        minute = int(self._clock() // 60)
        current, count, previous = self._minutes.get(model, (minute, 0, 0))
        if minute != current:
            previous = count if minute == current + 1 else 0
            current, count = minute, 0
        self._minutes[model] = (current, count + 1, previous)

    def observe(self, model: ServedModel, served: ServedVersion, batch: ValidatedBatch,
                results: dict[str, np.ndarray], request_id: str) -> None:
        """Hand a model answer to the side path (never blocks; a full queue drops and counts)."""
        card = served.entry.card
        if card is None or model.policy is None:
            return
        policy = model.policy.policy
        scores = _scores(card.score, results, batch.rows)
        if scores is not None:
            self.feedback.remember(model.name, policy.feedback, request_id, served.entry.version, scores)
            if self.shared is not None:
                self.shared.offer(model.name, policy.feedback.store, request_id, served.entry.version, scores)
        if card.reference_profile is None:
            return
        key = (model.name, served.entry.version)
        sources = self._sources.get(key)
        if sources is None or sources[0] is not policy:
            sources = self._sources[key] = (policy, {
                name: spec.input or name for name, spec in policy.input_schema.features.items()
                if name in card.reference_profile.features})
        queue = self._queues.get(model.name)
        if queue is None:
            queue = self._queues[model.name] = asyncio.Queue(maxsize=policy.drift.queue)
            self._tasks.append(asyncio.get_running_loop().create_task(self._fold(model.name, queue)))
        try:
            queue.put_nowait(_Job(served.entry.version, batch.feeds, sources[1], scores))
        except asyncio.QueueFull:
            self.dropped[model.name] = self.dropped.get(model.name, 0) + 1
            self._metrics.drift_dropped.labels(model.name).inc()

    # --- background ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic refresher (call from the running loop)."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_forever()))

    async def close(self) -> None:
        """Stop every task."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def drain(self) -> None:
        """Wait until every queued batch is folded in (for tests and reports on demand)."""
        for queue in list(self._queues.values()):
            await queue.join()

    async def _fold(self, model: str, queue: asyncio.Queue[_Job]) -> None:
        while True:
            jobs = [await queue.get()]
            await asyncio.sleep(FOLD_DELAY_S)  # let batches gather: one numpy pass for many requests
            while len(jobs) < FOLD_BATCH and not queue.empty():
                jobs.append(queue.get_nowait())
            try:
                for version in {job.version for job in jobs}:
                    window = self._window(model, version)
                    if window is not None:
                        mine = [job for job in jobs if job.version == version]
                        window.add(_columns(mine),
                                   None if any(j.scores is None for j in mine)
                                   else np.concatenate([j.scores for j in mine if j.scores is not None]))
            except Exception:  # a bad batch must not stop monitoring; it is logged and counted
                log.exception("drift update of %s failed", model)
                self._metrics.drift_dropped.labels(model).inc(len(jobs))
            finally:
                for _ in jobs:
                    queue.task_done()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for model in list(self._snapshot().models.values()):
                self.report(model.name)

    def _window(self, model: str, version: str) -> VersionDrift | None:
        served_model = self._snapshot().models.get(model)
        served = served_model.served.get(version) if served_model else None
        if served_model is None or served is None or served.entry.card is None or served_model.policy is None:
            return None
        policy = served_model.policy.policy.drift
        key = (model, version)
        known = self._windows.get(key)
        if known is None or known[0] != policy:
            profile = served.entry.card.reference_profile
            if profile is None:
                return None
            score = served.entry.card.score
            known = (policy, VersionDrift(profile, policy, score.index if score else None))
            self._windows[key] = known
        return known[1]

    # --- reports ---------------------------------------------------------------------------------

    def report(self, model_name: str, fresh: bool = False) -> dict[str, Any]:
        """Drift and outcome report of every version of a model (recomputed at the policy's cadence)."""
        model = self._snapshot().model(model_name)
        policy = model.policy.policy if model.policy else Policy.model_validate({"model": model_name, "schema": {
            "features": {}}})
        versions = []
        now = self._clock()
        for version in sorted(model.served):
            key = (model_name, version)
            cached = self._reports.get(key)
            if fresh or cached is None or now - cached[0] >= policy.drift.score_every_s:
                cached = (now, self._compute(model, version, policy))
                self._reports[key] = cached
            versions.append(cached[1])
        volume = self._volume(model_name, policy)
        self._metrics.requests_per_minute.labels(model_name).set(volume["last_minute"] or 0)
        if self._judge_volume:
            self._metrics.volume_anomaly.labels(model_name).set(1 if volume["state"] == "anomaly" else 0)
        for bound, value in zip(("min", "max"), volume["band"], strict=True):
            if value is not None:
                self._metrics.volume_band.labels(model_name, bound).set(value)
        queue = self._queues.get(model_name)
        return {"model": model_name, "versions": versions, "volume": volume,
                "queued_batches": queue.qsize() if queue else 0, "dropped_batches": self.dropped.get(model_name, 0)}

    def _compute(self, model: ServedModel, version: str, policy: Policy) -> dict[str, Any]:
        window = self._window(model.name, version)
        drift = window.report() if window is not None else None
        outcome = self.feedback.report(model.name, version, policy.feedback)
        m = self._metrics
        if drift is not None:
            m.drift_window_rows.labels(model.name, version).set(drift["window"]["rows"])
            entries = [*drift["features"].items(), *([(SCORE, drift["prediction"])] if drift["prediction"] else [])]
            for feature, entry in entries:
                m.drift_state.labels(model.name, version, feature).set(STATE_CODES[entry["state"]])
                for metric, value in (entry["scores"] or {}).items():
                    m.drift_score.labels(model.name, version, feature, metric).set(value)
            if drift["null_prediction_rate"] is not None:
                m.prediction_null_ratio.labels(model.name, version).set(drift["null_prediction_rate"])
        m.outcome_state.labels(model.name, version).set(STATE_CODES[outcome["state"]])
        for metric in ("accuracy", "auc", "brier"):
            if outcome.get(metric) is not None:
                m.outcome_metric.labels(model.name, version, metric).set(outcome[metric])
        return {"version": version, "drift": drift, "outcome": outcome}

    def _volume(self, model: str, policy: Policy) -> dict[str, Any]:
        minute = int(self._clock() // 60)
        current, count, previous = self._minutes.get(model, (minute, 0, 0))
        # no request since `current`: the last full minute saw `count` if it was `current`, else none
        last = previous if current == minute else count if current == minute - 1 else 0
        observed = minute - 1 >= self._first_full_minute  # a whole minute has been watched
        band = policy.drift.volume
        if not self._judge_volume:
            state = "fleet"  # judged over every replica by GatewayVolumeAnomaly, not on this share
        elif not observed:
            state = "insufficient"
        elif (band.min_per_minute is not None and last < band.min_per_minute) or (
                band.max_per_minute is not None and last > band.max_per_minute):
            state = "anomaly"
        else:
            state = "ok"
        return {"last_minute": last if observed else None, "this_minute": count if current == minute else 0,
                "band": [band.min_per_minute, band.max_per_minute], "state": state}

    async def accept_feedback(self, model: str, policy: Feedback, items: list[Any]) -> dict[str, Any]:
        """Join delayed labels to predictions. With shared predictions, those another replica or worker
        made are first taken out of Redis (each is labelled once, wherever its label lands), and those
        kept here are taken out of Redis too, so no other process can label them again."""
        shared = self.shared
        if shared is None:
            return self.feedback.accept(model, policy, items)
        ids = list(dict.fromkeys(i["id"] for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)))
        here = self.feedback.known(model, ids)
        kept_here = set(here)
        elsewhere = [i for i in ids if i not in kept_here]
        found = await asyncio.to_thread(shared.take, model, elsewhere) if elsewhere else {}
        for request_id, (version, scores) in found.items():
            self.feedback.remember(model, policy, request_id, version, scores)
        if here:
            await asyncio.to_thread(shared.forget, model, here)
        return self.feedback.accept(model, policy, items)

    def drift_state(self, model: str, version: str) -> str:
        """The version's overall drift state (for rollout criteria)."""
        cached = self._reports.get((model, version))
        if cached is None or cached[1]["drift"] is None:
            return "insufficient"
        return str(cached[1]["drift"]["state"])


def _columns(jobs: list[_Job]) -> dict[str, np.ndarray]:
    """One 1-D column per monitored feature over all the jobs' rows (first value of each row)."""
    columns = {}
    feeds = [job.feeds for job in jobs]
    for name, source in jobs[0].sources.items():
        try:
            parts = list(map(operator.itemgetter(source), feeds))  # C-level loop: many jobs per fold
        except KeyError:
            continue
        stacked = parts[0] if len(parts) == 1 else np.concatenate(parts)
        columns[name] = stacked.reshape(len(stacked), -1)[:, 0]
    return columns


def _scores(score: Any, results: dict[str, np.ndarray], rows: int) -> np.ndarray | None:
    if score is None or score.output not in results:
        return None
    column = results[score.output].reshape(rows, -1)
    return column[:, score.index or 0].astype(np.float64)
