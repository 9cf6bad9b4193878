"""OnnxModel.predict with a deadline: the answer is InferenceTimeout at once and the worker is freed."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pytest

from gateway.errors import InferenceFailed, InferenceTimeout
from gateway.repository import ModelRepository
from gateway.runtime import OnnxModel, RunControl, RuntimeOptions
from gateway.tensors import NUMPY_DTYPES
from tests.conftest import MODEL, MODELS, good_row

T = TypeVar("T")
BLOCK_LIMIT_S = 3.0  # how long a blocking before_run would wait if nobody cancelled it


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    entry = ModelRepository(MODELS, RuntimeOptions()).load_version(MODEL, "1")
    assert entry.ready, entry.reason
    assert entry.model is not None
    return entry.model


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="test-onnx")
    yield pool
    pool.shutdown(wait=True)


def row_feeds(model: OnnxModel) -> dict[str, np.ndarray]:
    row = good_row()
    feeds = {}
    for tensor in model.signature.inputs:
        value = row[tensor.name]
        dtype = NUMPY_DTYPES[tensor.datatype]
        feeds[tensor.name] = np.array([[value]], dtype=dtype)
    return feeds


class Blocker:
    """A before_run that blocks until its run is cancelled (or a long limit passes)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.controls: list[RunControl] = []
        self.woke_by_cancel: list[bool] = []

    def __call__(self, control: RunControl) -> None:
        self.controls.append(control)
        self.started.set()
        end = time.monotonic() + BLOCK_LIMIT_S
        while time.monotonic() < end and not self.release.is_set():
            if control.wait(0.01):
                self.woke_by_cancel.append(True)
                return
        self.woke_by_cancel.append(False)


def run_loop(scenario: Callable[[], Awaitable[T]]) -> tuple[T, list[dict[str, Any]]]:
    """Run a scenario on a fresh loop; also return what the loop's exception handler was told."""
    loop = asyncio.new_event_loop()
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    try:
        result = loop.run_until_complete(scenario())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    gc.collect()  # an unretrieved future exception is reported when the future is collected
    return result, reports


def test_the_harness_sees_an_unretrieved_future_exception() -> None:
    async def scenario() -> None:
        future = asyncio.get_running_loop().create_future()
        future.set_exception(InferenceFailed("nobody looks"))
        del future

    _, reports = run_loop(scenario)
    assert any("never retrieved" in str(r.get("message")) for r in reports)


def test_predict_without_a_deadline(model: OnnxModel, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> dict[str, np.ndarray]:
        return await model.predict(row_feeds(model), None, executor)

    results, reports = run_loop(scenario)
    assert results["label"].shape == (1,) and results["probabilities"].shape == (1, 2)
    assert reports == []


def test_predict_within_the_deadline_answers(model: OnnxModel, executor: ThreadPoolExecutor) -> None:
    async def scenario() -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        return await model.predict(row_feeds(model), ["probabilities"], executor, deadline=loop.time() + 5.0)

    results, reports = run_loop(scenario)
    assert list(results) == ["probabilities"]
    assert results["probabilities"].dtype == np.float32
    assert float(results["probabilities"].sum()) == pytest.approx(1.0, abs=1e-5)
    assert reports == []


@pytest.mark.parametrize("deadline_in", [-1.0, 0.0, 0.05], ids=["past", "now", "near-future"])
def test_a_missed_deadline_answers_at_once_and_frees_the_worker(
        model: OnnxModel, executor: ThreadPoolExecutor, deadline_in: float) -> None:
    blocker = Blocker()

    async def scenario() -> tuple[float, float, dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        with pytest.raises(InferenceTimeout, match="deadline passed"):
            await model.predict(row_feeds(model), None, executor, deadline=loop.time() + deadline_in,
                                before_run=blocker)
        timed_out_after = time.perf_counter() - started
        # the same single worker answers the next call quickly: the blocked run was cancelled
        started = time.perf_counter()
        results = await model.predict(row_feeds(model), None, executor, deadline=loop.time() + 2.0)
        return timed_out_after, time.perf_counter() - started, results

    (timed_out_after, next_took, results), reports = run_loop(scenario)
    assert timed_out_after < max(deadline_in, 0.0) + 0.5 < BLOCK_LIMIT_S
    assert next_took < 0.5
    assert results["label"].shape == (1,)
    assert blocker.woke_by_cancel == [True]  # woken by the cancel (or cancelled before it began)
    assert all(c.is_cancelled and c.options.terminate for c in blocker.controls)
    assert [r for r in reports if "never retrieved" in str(r.get("message"))] == []
    assert reports == []


def test_a_run_still_queued_at_the_deadline_is_dropped_when_its_turn_comes(
        model: OnnxModel, executor: ThreadPoolExecutor) -> None:
    first, queued = Blocker(), Blocker()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        busy = asyncio.ensure_future(model.predict(row_feeds(model), None, executor, before_run=first))
        await asyncio.to_thread(first.started.wait, 2.0)
        with pytest.raises(InferenceTimeout):
            await model.predict(row_feeds(model), None, executor, deadline=loop.time() + 0.05, before_run=queued)
        first.release.set()
        await busy
        await model.predict(row_feeds(model), None, executor, deadline=loop.time() + 2.0)

    _, reports = run_loop(scenario)
    assert first.woke_by_cancel == [False]  # released by the test, not cancelled
    assert queued.woke_by_cancel == [True]
    assert queued.controls[0].is_cancelled
    assert reports == []


def test_the_abandoned_runs_failure_is_retrieved(model: OnnxModel, executor: ThreadPoolExecutor) -> None:
    def fails_when_cancelled(control: RunControl) -> None:
        control.wait(BLOCK_LIMIT_S)
        raise InferenceFailed("the abandoned run fails after the caller left")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(3):
            with pytest.raises(InferenceTimeout):
                await model.predict(row_feeds(model), None, executor, deadline=loop.time() + 0.02,
                                    before_run=fails_when_cancelled)
        await model.predict(row_feeds(model), None, executor, deadline=loop.time() + 2.0)

    started = time.perf_counter()
    _, reports = run_loop(scenario)
    assert time.perf_counter() - started < 1.0
    assert reports == []


def test_cancelling_the_caller_cancels_the_run(model: OnnxModel, executor: ThreadPoolExecutor) -> None:
    blocker = Blocker()

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(model.predict(row_feeds(model), None, executor,
                                                   deadline=loop.time() + 10.0, before_run=blocker))
        await asyncio.to_thread(blocker.started.wait, 2.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        try:
            return await asyncio.to_thread(blocker.controls[0].wait, 0.2)
        finally:
            blocker.release.set()
            await asyncio.wrap_future(executor.submit(lambda: None))

    cancelled, reports = run_loop(scenario)
    assert reports == []
    assert cancelled
