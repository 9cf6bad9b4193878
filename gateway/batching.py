"""Dynamic batching: concurrent requests for one model version share one onnxruntime call.

Requests arrive already validated (one bad request never reaches a batch, so it cannot fail its
batch-mates). A batch closes when it holds `max_batch_size` rows or when its oldest request has
waited `max_queue_delay_ms`; it then runs on the worker pool, one thread hop for the whole batch,
and each request gets its own rows back. While `max_in_flight` batches are running, closed
batches wait for the pool instead of being queued behind it, so rows that arrive meanwhile join
them and batches grow with load (adaptive batching).

Every request keeps its own deadline: a request whose deadline passes leaves its batch with
InferenceTimeout at once (its batch-mates are not affected); a batch none of whose requests still
waits is not run, or is terminated if it is already running. A runtime error fails every request
of the batch that hit it, each of which then takes its own fallback.
"""

from __future__ import annotations

import asyncio
import functools
import operator
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import InferenceFailed, InferenceTimeout, QueuedTooLong
from gateway.runtime import BeforeRun, InlineRunner, OnnxModel, RunControl


@dataclass(eq=False)
class _Request:
    feeds: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]]
    deadline: float
    batch: _Batch | None = None


@dataclass(eq=False)
class _Batch:
    requests: list[_Request]
    control: RunControl = field(default_factory=RunControl)
    finished: bool = False

    def abandoned(self) -> bool:
        return all(r.future.done() for r in self.requests)


class Batcher:
    """Gathers one version's concurrent requests into batches and runs each batch once."""

    def __init__(self, model: OnnxModel, max_batch_size: int, max_queue_delay_s: float,
                 max_in_flight: int = 1, inline: InlineRunner | None = None,
                 faults: Callable[[], BeforeRun | None] | None = None) -> None:
        self.model = model
        self.faults = faults
        """Draws a rehearsal fault per batch (a batch is one model call); pool batches only."""
        self.inline = inline
        """Run batches on the event loop (under this runner's watchdog) instead of the pool."""
        self._soon = False
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_in_flight = max(1, max_in_flight)
        self._waiting: deque[_Request] = deque()
        self._waiting_rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._due = False
        self._in_flight = 0
        self.batches = 0
        """Batches run so far."""
        self.batched_rows = 0
        """Rows run in those batches."""

    def status(self) -> dict[str, float | int]:
        """JSON-ready counters for the status endpoint."""
        return {"max_batch_size": self.max_batch_size, "max_queue_delay_ms": self.max_queue_delay_s * 1000,
                "batches": self.batches, "rows": self.batched_rows,
                "mean_rows": round(self.batched_rows / self.batches, 2) if self.batches else 0.0,
                "queued": len(self._waiting), "running": self._in_flight}

    async def run(self, feeds: Mapping[str, np.ndarray], rows: int, outputs: Sequence[str] | None,
                  executor: ThreadPoolExecutor, deadline: float) -> dict[str, np.ndarray]:
        """This request's rows of its batch's outputs; InferenceTimeout at its own deadline."""
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            raise QueuedTooLong("deadline passed before the request could join a batch")
        request = _Request(feeds, rows, loop.create_future(), deadline)
        self._waiting.append(request)
        self._waiting_rows += rows
        if self._due or self._waiting_rows >= self.max_batch_size or self.max_queue_delay_s <= 0:
            self._due = True
            self._kick(loop, executor)
        elif self._timer is None:
            self._timer = loop.call_later(self.max_queue_delay_s, self._on_delay, loop, executor)
        # An inline batcher without a delay runs this request in the next loop turn, and `_take`
        # checks the deadline there; a timer per request would only cost heap pushes on the hot path.
        expiry = None if self.inline is not None and self.max_queue_delay_s <= 0 else loop.call_at(
            deadline, _expire, request)
        try:
            results = await request.future
        finally:
            if expiry is not None:
                expiry.cancel()
            batch = request.batch
            if batch is not None and not batch.finished and batch.abandoned():
                batch.control.cancel()  # nobody waits for this batch any more (timed out or went away)
            elif batch is None and request.future.done():
                self._forget(request)
        if outputs:
            return {name: results[name] for name in outputs}
        return results

    def _forget(self, request: _Request) -> None:
        try:
            self._waiting.remove(request)
        except ValueError:
            return
        self._waiting_rows -= request.rows
        if not self._waiting:  # nothing left to be due: the next request starts afresh
            self._due = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _on_delay(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor) -> None:
        self._timer = None
        self._due = True
        self._kick(loop, executor)

    def _kick(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor) -> None:
        if self.inline is None:
            self._dispatch(loop, executor)
        elif not self._soon:  # after the callbacks already due: requests of this loop turn join in
            self._soon = True
            loop.call_soon(self._dispatch_inline)

    def _dispatch_inline(self) -> None:
        """Run every waiting request now, on the loop, in batches of at most max_batch_size rows."""
        assert self.inline is not None
        self._soon = False
        self._due = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            batch = self._take()
            if batch is None:
                continue
            self.batches += 1
            self.batched_rows += sum(r.rows for r in batch.requests)
            try:
                feeds = _stacked(batch.requests)
                results = self.inline.run(self.model, feeds, None, _latest_deadline(batch.requests))
                answers = _split(results, batch.requests)
            except Exception as exc:  # a failed run fails its batch, never the loop or the rest of the turn
                batch.finished = True
                kind = type(exc) if isinstance(exc, (InferenceFailed, InferenceTimeout)) else InferenceFailed
                message = str(exc) if kind is type(exc) else f"batch run failed: {exc}"
                for request in batch.requests:
                    if not request.future.done():
                        request.future.set_exception(kind(message))  # one instance per request
                continue
            batch.finished = True
            for request, result in zip(batch.requests, answers, strict=True):
                if not request.future.done():
                    request.future.set_result(result)

    def _dispatch(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor) -> None:
        """Start batches while one is due and the pool has room."""
        while self._due and self._waiting and self._in_flight < self.max_in_flight:
            batch = self._take()
            if batch is None:
                continue
            self._in_flight += 1
            self.batches += 1
            self.batched_rows += sum(r.rows for r in batch.requests)
            before_run = self.faults() if self.faults is not None else None
            future = loop.run_in_executor(executor, self._run, batch, before_run)
            future.add_done_callback(functools.partial(self._finished, batch=batch, loop=loop, executor=executor))
        if not self._waiting:
            self._due = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif (self._in_flight < self.max_in_flight and self._waiting_rows < self.max_batch_size
              and self.max_queue_delay_s > 0):
            self._due = False  # what is left waits for its own delay (or for rows to fill it)
            if self._timer is None:
                self._timer = loop.call_later(self.max_queue_delay_s, self._on_delay, loop, executor)

    def _take(self) -> _Batch | None:
        """Up to max_batch_size rows of live requests, oldest first (a larger request runs alone)."""
        taken: list[_Request] = []
        rows = 0
        now = asyncio.get_running_loop().time()
        while self._waiting:
            request = self._waiting[0]
            if taken and rows + request.rows > self.max_batch_size:
                break
            self._waiting.popleft()
            self._waiting_rows -= request.rows
            if request.future.done():  # timed out (or its client left) while it waited
                continue
            if now >= request.deadline:  # due, but the loop was too busy to run its expiry yet
                _expire(request)
                continue
            taken.append(request)
            rows += request.rows
        if not taken:
            return None
        batch = _Batch(taken)
        for request in taken:
            request.batch = batch
        return batch

    def _run(self, batch: _Batch, before_run: BeforeRun | None) -> list[dict[str, np.ndarray]]:
        """In a worker thread: concatenate, run once, split by rows."""
        if batch.abandoned():
            return []
        results = self.model.run(_stacked(batch.requests), None, batch.control, before_run)
        return _split(results, batch.requests)

    def _finished(self, future: asyncio.Future[list[dict[str, np.ndarray]]], batch: _Batch,
                  loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor) -> None:
        self._in_flight -= 1
        batch.finished = True
        error = future.exception() if not future.cancelled() else InferenceFailed("batch run cancelled")
        if error is None:
            for request, result in zip(batch.requests, future.result(), strict=False):
                if not request.future.done():
                    request.future.set_result(result)
        else:
            message = str(error) if isinstance(error, InferenceFailed) else f"batch run failed: {error}"
            for request in batch.requests:
                if not request.future.done():
                    request.future.set_exception(InferenceFailed(message))  # one instance per request
        if self._waiting:
            self._due = True  # these requests waited for the pool: run them now
            self._dispatch(loop, executor)


def _stacked(requests: list[_Request]) -> dict[str, np.ndarray]:
    if len(requests) == 1:
        return dict(requests[0].feeds)
    feeds = [r.feeds for r in requests]
    return {name: np.concatenate(list(map(operator.itemgetter(name), feeds))) for name in requests[0].feeds}


def _split(results: dict[str, np.ndarray], requests: list[_Request]) -> list[dict[str, np.ndarray]]:
    if len(requests) == 1:
        return [results]
    split = []
    start = 0
    for request in requests:
        stop = start + request.rows
        split.append({name: array[start:stop] for name, array in results.items()})
        start = stop
    return split


def _latest_deadline(requests: list[_Request]) -> float:
    return max(r.deadline for r in requests)


def _expire(request: _Request) -> None:
    if not request.future.done():
        request.future.set_exception(InferenceTimeout("deadline passed before the batch answered")
                                     if request.batch is not None
                                     else QueuedTooLong("deadline passed while waiting for a batch"))
