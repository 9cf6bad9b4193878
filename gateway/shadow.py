"""Shadow traffic: a bounded, per-model mirror of sampled requests to the shadow version.

The client's answer is already decided when a job is offered; offering is a non-blocking put on
a bounded queue (full: the job is dropped and counted). One worker per model runs jobs one at a
time under the model's deadline, so a hanging shadow holds at most one worker thread and can
neither slow nor change any client's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.errors import GatewayError
from gateway.registry import Snapshot
from gateway.stats import TrafficStats
from gateway.telemetry import Metrics
from gateway.validation import Column

log = logging.getLogger("gateway.shadow")


@dataclass(frozen=True)
class ShadowJob:
    """One mirrored request and what the primary answered."""

    model: str
    version: str
    columns: dict[str, Column]
    primary: dict[str, np.ndarray]
    request_id: str = ""
    primary_version: str = ""


class ShadowMirror:
    """Per-model bounded queues and their workers."""

    def __init__(self, snapshot: Callable[[], Snapshot], executor: ThreadPoolExecutor, stats: TrafficStats,
                 metrics: Metrics, audit: Callable[[dict[str, Any]], Awaitable[Any]] | None = None) -> None:
        self._audit = audit
        self._snapshot = snapshot
        self._executor = executor
        self._stats = stats
        self._metrics = metrics
        self._queues: dict[str, asyncio.Queue[ShadowJob]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self.dropped: dict[str, int] = {}

    def offer(self, job: ShadowJob, capacity: int) -> bool:
        """Queue a job without waiting; False (and counted) when the model's queue is full."""
        queue = self._queues.get(job.model)
        if queue is None:
            queue = self._queues[job.model] = asyncio.Queue(maxsize=capacity)
            self._metrics.sample(self._metrics.shadow_queue_depth.labels(job.model), queue.qsize)
            self._workers[job.model] = asyncio.get_running_loop().create_task(self._work(job.model, queue))
        try:
            queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped[job.model] = self.dropped.get(job.model, 0) + 1
            self._metrics.shadow.labels(job.model, job.version, "dropped").inc()
            return False
        return True

    def depth(self, model: str) -> int:
        """Jobs waiting for the shadow of `model`."""
        queue = self._queues.get(model)
        return queue.qsize() if queue else 0

    async def close(self) -> None:
        """Stop the workers (queued jobs are dropped: they never affect clients)."""
        for task in self._workers.values():
            task.cancel()
        for task in self._workers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _work(self, model_name: str, queue: asyncio.Queue[ShadowJob]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await queue.get()
            try:
                await self._run(job, loop)
            except GatewayError as exc:
                self._metrics.shadow.labels(job.model, job.version, "failed").inc()
                log.debug("shadow call to %s/%s failed: %s", job.model, job.version, exc)
            finally:
                queue.task_done()

    async def _run(self, job: ShadowJob, loop: asyncio.AbstractEventLoop) -> None:
        model = self._snapshot().models.get(job.model)
        served = model.served.get(job.version) if model else None
        if model is None or served is None or served.entry.model is None:
            self._metrics.shadow.labels(job.model, job.version, "failed").inc()
            return
        batch = served.validator.validate(job.columns)
        before_run = served.faults.before_run() if served.faults else None
        outputs = await served.entry.model.predict(batch.feeds, None, self._executor,
                                                   loop.time() + model.timeout_s, before_run)
        disagreements, diffs = compare(job.primary, outputs, served.entry.card.score if served.entry.card else None)
        self._stats.record_shadow(job.model, job.version, batch.rows, disagreements, diffs)
        if self._audit is not None and model.policy is not None and model.policy.policy.audit.enabled:
            await self._audit({"kind": "shadow", "time": time.time(), "request_id": job.request_id,
                               "model": job.model, "version": job.version, "route": "shadow",
                               "primary_version": job.primary_version,
                               "outputs": {k: (v.tolist() if v.dtype.kind == "O" else v) for k, v in outputs.items()},
                               "disagreements": disagreements, "policy_sha256": model.policy.sha256,
                               "model_sha256": served.entry.sha256})
        self._metrics.shadow.labels(job.model, job.version, "compared").inc()
        self._metrics.shadow_rows.labels(job.model, job.version).inc(batch.rows)
        self._metrics.shadow_disagreements.labels(job.model, job.version).inc(disagreements)
        for diff in diffs:
            self._metrics.shadow_score_diff.labels(job.model, job.version).observe(float(diff))


def compare(primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray], score: Any) -> tuple[int, np.ndarray]:
    """(rows whose discrete outputs differ, absolute score differences per row) over shared outputs."""
    rows = next(iter(primary.values())).shape[0] if primary else 0
    differs = np.zeros(rows, dtype=bool)
    for name, mine in primary.items():
        theirs = shadow.get(name)
        if theirs is None or theirs.shape != mine.shape or mine.dtype.kind == "f":
            continue
        differs |= (mine.reshape(rows, -1) != theirs.reshape(rows, -1)).any(axis=1)
    diffs = np.zeros(0)
    scored = score.output if score is not None else next((n for n, a in primary.items() if a.dtype.kind == "f"), None)
    if scored is not None and scored in primary and scored in shadow and primary[scored].shape == shadow[scored].shape:
        index = score.index if score is not None and score.index is not None else 0
        mine = primary[scored].reshape(rows, -1)[:, index].astype(np.float64)
        theirs = shadow[scored].reshape(rows, -1)[:, index].astype(np.float64)
        diffs = np.abs(mine - theirs)
    return int(differs.sum()), diffs
