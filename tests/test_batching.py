"""Dynamic batching: Batcher over the real credit-risk model, and batching through the real server."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import numpy as np
import orjson
import pytest

from gateway.batching import Batcher
from gateway.codec import decode_v2
from gateway.errors import InferenceFailed, InferenceTimeout
from gateway.faults import FaultInjector
from gateway.policy import Fault, load_policy
from gateway.registry import INLINE_MAX_BATCH
from gateway.repository import ModelRepository
from gateway.runtime import BeforeRun, OnnxModel, RunControl, RuntimeOptions
from gateway.validation import RequestValidator
from tests.conftest import MODEL, MODELS, POLICIES, RunningServer, good_row, patch_policy, v2_body

T = TypeVar("T")
Feeds = dict[str, np.ndarray]
StartServer = Callable[..., RunningServer]

LONG_S = 30.0
"""A deadline no test reaches."""
HOLD_LIMIT_S = 10.0
"""How long a held batch (or a wait in a test) lasts at most, so a failing test does not hang."""

EMPLOYMENT = ["salaried", "self_employed", "unemployed", "retired", "student"]
HOMES = ["rent", "own", "mortgage", "other"]
PURPOSES = ["debt_consolidation", "car", "home_improvement", "education", "medical", "business", "other"]


# --- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model() -> OnnxModel:
    entry = ModelRepository(MODELS, RuntimeOptions()).load_version(MODEL, "1")
    assert entry.ready and entry.model is not None, entry.reason
    return entry.model


@pytest.fixture(scope="module")
def validator(model: OnnxModel) -> RequestValidator:
    schema = load_policy(POLICIES / f"{MODEL}.yaml").policy.input_schema
    return RequestValidator(model.signature, schema, max_listed=100)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-batch")
    yield pool
    pool.shutdown(wait=True)


class Gate:
    """A before_run that holds its run until released or cancelled, then optionally fails it."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        self.controls: list[RunControl] = []
        self.woke_by_cancel: list[bool] = []

    def __call__(self, control: RunControl) -> None:
        self.controls.append(control)
        self.entered.set()
        end = time.monotonic() + HOLD_LIMIT_S
        woke = False
        while not self.release.is_set() and time.monotonic() < end:
            if control.wait(0.005):
                woke = True
                break
        self.woke_by_cancel.append(woke)
        if self.fail is not None:
            raise self.fail


@pytest.fixture
def gates(executor: ThreadPoolExecutor) -> Iterator[Callable[..., Gate]]:
    """Make gates; all are released before the executor shuts down (teardown never waits on a gate)."""
    made: list[Gate] = []

    def make(fail: Exception | None = None) -> Gate:
        made.append(Gate(fail))
        return made[-1]

    yield make
    for gate in made:
        gate.release.set()


class FaultQueue:
    """A batcher's `faults` source for these tests: planned before_runs, one per batch, in dispatch order.

    The batcher draws once per batch (production passes `FaultInjector.before_run`). `FaultQueue(gate)`
    hands `gate` to the first batch only; every batch after the plan draws None (runs undisturbed).
    """

    def __init__(self, *plan: BeforeRun | None) -> None:
        self.plan: deque[BeforeRun | None] = deque(plan)
        self.draws = 0
        """Batches that drew so far."""

    def draw(self) -> BeforeRun | None:
        self.draws += 1
        return self.plan.popleft() if self.plan else None


class Recording:
    """Stands in for an OnnxModel: records the rows of every run it is asked for, delegates the run."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.signature = model.signature
        self.output_names = model.output_names
        self.rows: list[int] = []

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
            control: RunControl | None = None, before_run: BeforeRun | None = None) -> dict[str, np.ndarray]:
        self.rows.append(len(next(iter(feeds.values()))))
        return self.model.run(feeds, outputs, control, before_run)


def recording(model: OnnxModel) -> tuple[Recording, OnnxModel]:
    stand_in = Recording(model)
    return stand_in, cast(OnnxModel, stand_in)


def settle(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run a scenario on a fresh loop; fail if the loop reported anything (e.g. an unretrieved exception)."""
    loop = asyncio.new_event_loop()
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    try:
        result = loop.run_until_complete(asyncio.wait_for(scenario(), HOLD_LIMIT_S * 2))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    gc.collect()  # an unretrieved future exception is reported when the future is collected
    assert reports == []
    return result


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (bounded by HOLD_LIMIT_S)."""
    end = time.monotonic() + HOLD_LIMIT_S
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.001)


async def entered(gate: Gate) -> None:
    """Wait, without blocking the loop, until a batch is held by `gate`."""
    assert await asyncio.to_thread(gate.entered.wait, HOLD_LIMIT_S)


def application(i: int) -> dict[str, Any]:
    """A valid credit-risk application that differs from application(j) for j != i."""
    return {**good_row(), "age": 19 + (i * 7) % 80, "income": 12000.0 + 3517.0 * i,
            "loan_amount": 1000.0 + 977.0 * i, "loan_term_months": 6 + (i * 5) % 110,
            "credit_history_years": round((i * 1.3) % 40, 2) if i % 7 else None,
            "num_open_accounts": i % 15, "debt_to_income": round(0.02 + (i * 0.037) % 1.5, 3),
            "delinquencies_2y": i % 4, "has_cosigner": i % 3 == 0, "employment": EMPLOYMENT[i % 5],
            "home_ownership": HOMES[i % 4], "purpose": PURPOSES[i % 7]}


def applications(requests: int) -> list[list[dict[str, Any]]]:
    """`requests` requests of 1-3 rows each, no row repeated."""
    out, i = [], 0
    for k in range(requests):
        rows = 1 + k % 3
        out.append([application(i + j) for j in range(rows)])
        i += rows
    return out


def validated(validator: RequestValidator, rows: list[dict[str, Any]]) -> tuple[Feeds, int]:
    """The feeds the pipeline would hand the batcher for a v2 request with these rows."""
    batch = validator.validate(decode_v2(orjson.dumps(v2_body(rows)), None).columns)
    return batch.feeds, batch.rows


def assert_same_answer(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        if want.dtype.kind in "iub":
            np.testing.assert_array_equal(got[name], want)
        else:
            np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)


def raising(error: Exception) -> BeforeRun:
    def before_run(_control: RunControl) -> None:
        raise error

    return before_run


# --- batched answers ------------------------------------------------------------------------------

def test_batched_answers_equal_single_answers(model: OnnxModel, validator: RequestValidator,
                                              executor: ThreadPoolExecutor) -> None:
    requests = [validated(validator, rows) for rows in applications(12)]
    stand_in, wrapped = recording(model)
    faults = FaultQueue()
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.05, faults=faults.draw)

    async def scenario() -> list[dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S)
                                      for feeds, rows in requests))

    answers = settle(scenario)
    for (feeds, rows), got in zip(requests, answers, strict=True):
        assert got["label"].shape == (rows,) and got["probabilities"].shape == (rows, 2)
        assert_same_answer(got, model.run(feeds))
    total = sum(rows for _, rows in requests)
    status = batcher.status()
    # all 12 requests joined the queue before the 50 ms delay could close the batch
    assert status["batches"] == 1 < len(requests)
    assert status["rows"] == total and status["mean_rows"] == total
    assert status["queued"] == 0 and status["running"] == 0
    assert stand_in.rows == [total]
    assert faults.draws == 1  # rehearsal faults are drawn per batch (one model call), not per request


def test_each_request_gets_only_the_outputs_it_asked_for(model: OnnxModel, validator: RequestValidator,
                                                        executor: ThreadPoolExecutor) -> None:
    requests = [validated(validator, rows) for rows in applications(4)]
    wanted: list[list[str] | None] = [["probabilities"], None, ["label"], ["label", "probabilities"]]
    batcher = Batcher(model, max_batch_size=64, max_queue_delay_s=0.02)

    async def scenario() -> list[dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(batcher.run(feeds, rows, outputs, executor, loop.time() + LONG_S)
                                      for (feeds, rows), outputs in zip(requests, wanted, strict=True)))

    answers = settle(scenario)
    for (feeds, _), outputs, got in zip(requests, wanted, answers, strict=True):
        expected = model.run(feeds)
        assert list(got) == (outputs or list(expected))
        assert_same_answer(got, {name: expected[name] for name in got})
    assert batcher.status()["batches"] == 1


def test_no_batch_exceeds_max_batch_size(model: OnnxModel, validator: RequestValidator,
                                         executor: ThreadPoolExecutor) -> None:
    requests = [validated(validator, [application(i)]) for i in range(10)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=4, max_queue_delay_s=0.02)

    async def scenario() -> list[dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S)
                                      for feeds, rows in requests))

    answers = settle(scenario)
    for (feeds, _), got in zip(requests, answers, strict=True):
        assert_same_answer(got, model.run(feeds))
    status = batcher.status()
    assert status["batches"] >= 3 and status["rows"] == 10
    assert status["batches"] == len(stand_in.rows) and sum(stand_in.rows) == 10
    assert max(stand_in.rows) <= 4, stand_in.rows


def test_a_request_larger_than_max_batch_size_runs_alone(model: OnnxModel, validator: RequestValidator,
                                                         executor: ThreadPoolExecutor) -> None:
    big = validated(validator, [application(i) for i in range(6)])
    small = [validated(validator, [application(i)]) for i in (10, 11)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=4, max_queue_delay_s=0.02)

    async def scenario() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        loop = asyncio.get_running_loop()
        alone = await batcher.run(*big, None, executor, loop.time() + LONG_S)
        mixed = await asyncio.gather(*(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S)
                                       for feeds, rows in (small[0], big, small[1])))
        return alone, mixed

    alone, mixed = settle(scenario)
    assert_same_answer(alone, model.run(big[0]))
    for (feeds, _), got in zip((small[0], big, small[1]), mixed, strict=True):
        assert_same_answer(got, model.run(feeds))
    # the 6-row request never shares a batch: the rows before it and after it run in their own
    assert stand_in.rows == [6, 1, 6, 1]
    assert batcher.status()["rows"] == 14


# --- deadlines and cancellation ---------------------------------------------------------------

def test_a_request_whose_deadline_passes_leaves_its_batch_alone(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(4)]
    gate = gates()
    faults = FaultQueue(gate)  # the batch of the four requests is held by `gate`
    batcher = Batcher(model, max_batch_size=4, max_queue_delay_s=0.5, faults=faults.draw)

    async def scenario() -> tuple[BaseException | None, bool, bool, list[dict[str, np.ndarray]]]:
        loop = asyncio.get_running_loop()
        # the 4th request fills the batch, which closes at once with all four in it
        deadlines = [loop.time() + LONG_S, loop.time() + 0.05, loop.time() + LONG_S, loop.time() + LONG_S]
        tasks = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, deadline))
                 for (feeds, rows), deadline in zip(requests, deadlines, strict=True)]
        await entered(gate)
        await asyncio.wait({tasks[1]}, timeout=HOLD_LIMIT_S)
        short = tasks[1].exception() if tasks[1].done() else None
        mates_still_waiting = not any(t.done() for i, t in enumerate(tasks) if i != 1)
        run_cancelled = gate.controls[0].is_cancelled
        gate.release.set()
        answers = await asyncio.gather(*(t for i, t in enumerate(tasks) if i != 1))
        return short, mates_still_waiting, run_cancelled, answers

    short, mates_still_waiting, run_cancelled, answers = settle(scenario)
    assert isinstance(short, InferenceTimeout) and "before the batch answered" in str(short)
    assert mates_still_waiting
    for (feeds, _), got in zip((r for i, r in enumerate(requests) if i != 1), answers, strict=True):
        assert_same_answer(got, model.run(feeds))
    assert gate.woke_by_cancel == [False] and not run_cancelled
    assert batcher.status()["batches"] == 1 and batcher.status()["rows"] == 4 and faults.draws == 1


def test_a_request_that_expires_while_queued_never_joins_a_batch(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor) -> None:
    requests = [validated(validator, [application(i)]) for i in range(3)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.3)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        deadlines = [loop.time() + LONG_S, loop.time() + 0.02, loop.time() + LONG_S]
        return list(await asyncio.gather(*(batcher.run(feeds, rows, None, executor, deadline)
                                           for (feeds, rows), deadline in zip(requests, deadlines, strict=True)),
                                         return_exceptions=True))

    first, expired, last = settle(scenario)
    assert isinstance(expired, InferenceTimeout) and "waiting for a batch" in str(expired)
    assert_same_answer(first, model.run(requests[0][0]))
    assert_same_answer(last, model.run(requests[2][0]))
    assert stand_in.rows == [2]
    assert batcher.status()["rows"] == 2 and batcher.status()["queued"] == 0


def test_a_running_batch_nobody_waits_for_is_cancelled(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(2)]
    gate = gates()
    faults = FaultQueue(gate)  # the first batch is held; the one after it runs undisturbed
    batcher = Batcher(model, max_batch_size=2, max_queue_delay_s=0.5, faults=faults.draw)

    async def scenario() -> tuple[list[Any], bool, dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + 0.1))
                 for feeds, rows in requests]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        cancelled = await asyncio.to_thread(gate.controls[0].wait, HOLD_LIMIT_S)
        await until(lambda: batcher.status()["running"] == 0)
        after = await batcher.run(*requests[0], None, executor, loop.time() + LONG_S)
        return outcomes, cancelled, after

    outcomes, cancelled, after = settle(scenario)
    assert all(isinstance(o, InferenceTimeout) for o in outcomes), outcomes
    assert cancelled and gate.controls[0].is_cancelled and gate.controls[0].options.terminate
    assert gate.woke_by_cancel == [True]
    assert_same_answer(after, model.run(requests[0][0]))  # the pool is free again
    assert batcher.status()["batches"] == 2 and faults.draws == 2


def test_a_queued_batch_nobody_waits_for_is_never_run(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(3)]
    gate = gates()
    faults = FaultQueue(gate)  # the first batch is held
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0, faults=faults.draw)

    async def scenario() -> tuple[dict[str, np.ndarray], list[Any]]:
        loop = asyncio.get_running_loop()
        held = asyncio.ensure_future(batcher.run(*requests[0], None, executor, loop.time() + LONG_S))
        await entered(gate)
        expired = await asyncio.gather(*(batcher.run(feeds, rows, None, executor, loop.time() + 0.05)
                                         for feeds, rows in requests[1:]), return_exceptions=True)
        assert batcher.status()["queued"] == 0  # the expired requests left the queue
        gate.release.set()
        return await held, expired

    held, expired = settle(scenario)
    assert all(isinstance(e, InferenceTimeout) for e in expired), expired
    assert_same_answer(held, model.run(requests[0][0]))
    assert stand_in.rows == [1] and len(gate.controls) == 1
    assert batcher.status()["batches"] == 1 and faults.draws == 1  # a batch never dispatched draws nothing


def test_cancelling_one_waiting_client_does_not_break_its_batch_mates(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, rows) for rows in applications(3)]
    gate = gates()
    faults = FaultQueue(gate)  # the batch of the three requests is held
    batcher = Batcher(model, max_batch_size=6, max_queue_delay_s=0.5, faults=faults.draw)

    async def scenario() -> tuple[bool, list[dict[str, np.ndarray]]]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S))
                 for feeds, rows in requests]  # 1 + 2 + 3 rows: the batch is full and runs at once
        await entered(gate)
        tasks[1].cancel()
        await asyncio.wait({tasks[1]}, timeout=HOLD_LIMIT_S)
        gate.release.set()
        return tasks[1].cancelled(), list(await asyncio.gather(tasks[0], tasks[2]))

    was_cancelled, answers = settle(scenario)
    assert was_cancelled
    assert_same_answer(answers[0], model.run(requests[0][0]))
    assert_same_answer(answers[1], model.run(requests[2][0]))
    assert gate.woke_by_cancel == [False]  # the batch ran on for the clients still waiting


def test_a_client_cancelled_while_queued_is_left_out_of_the_next_batch(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(4)]
    gate = gates()
    faults = FaultQueue(gate)  # the first request's batch is held; the next batch runs undisturbed
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0, faults=faults.draw)

    async def scenario() -> list[dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(batcher.run(*requests[0], None, executor, loop.time() + LONG_S))]
        await entered(gate)
        tasks += [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S))
                  for feeds, rows in requests[1:]]
        await until(lambda: batcher.status()["queued"] == 3)
        tasks[2].cancel()
        await asyncio.wait({tasks[2]}, timeout=HOLD_LIMIT_S)
        assert tasks[2].cancelled() and batcher.status()["queued"] == 2
        gate.release.set()
        return await asyncio.gather(*(t for i, t in enumerate(tasks) if i != 2))

    answers = settle(scenario)
    for i, got in zip((0, 1, 3), answers, strict=True):
        assert_same_answer(got, model.run(requests[i][0]))
    assert stand_in.rows == [1, 2]
    assert batcher.status()["rows"] == 3


def test_a_running_batch_whose_clients_all_went_away_is_cancelled(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(2)]
    gate = gates()
    faults = FaultQueue(gate)  # the first batch is held; the one after it runs undisturbed
    batcher = Batcher(model, max_batch_size=2, max_queue_delay_s=0.5, faults=faults.draw)

    async def scenario() -> tuple[bool, bool, bool, dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S))
                 for feeds, rows in requests]  # a full batch: it runs at once, and is held
        await entered(gate)
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=HOLD_LIMIT_S)
        all_cancelled = all(task.cancelled() for task in tasks)
        cancelled_when_gone = gate.controls[0].is_cancelled  # before anything else ran on the loop
        woke = await asyncio.to_thread(gate.controls[0].wait, HOLD_LIMIT_S)
        await until(lambda: batcher.status()["running"] == 0)
        after = await batcher.run(*requests[0], None, executor, loop.time() + LONG_S)
        return all_cancelled, cancelled_when_gone, woke, after

    all_cancelled, cancelled_when_gone, woke, after = settle(scenario)
    assert all_cancelled
    # like OnnxModel.predict, whose run is cancelled when its caller is
    assert cancelled_when_gone and woke and gate.controls[0].options.terminate
    assert gate.woke_by_cancel == [True]  # the held run was stopped, not released
    assert_same_answer(after, model.run(requests[0][0]))  # the pool is free again
    assert batcher.status()["batches"] == 2 and faults.draws == 2


@pytest.mark.parametrize("leaves_by", ["expiry", "cancellation"])
def test_a_lone_request_after_the_queue_emptied_waits_for_its_delay_and_runs(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate], leaves_by: str) -> None:
    requests = [validated(validator, [application(i)]) for i in range(4)]
    gate = gates()
    faults = FaultQueue(gate)  # the first batch is held; later ones run undisturbed
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=2, max_queue_delay_s=0.01, faults=faults.draw)

    async def scenario() -> tuple[dict[str, float | int], dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        held = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S))
                for feeds, rows in requests[:2]]  # a full batch: it runs at once, and is held
        await entered(gate)
        # the third request's 10 ms delay passes while the pool is busy (its batch is due, waiting for
        # the pool); then it leaves the queue, which empties
        if leaves_by == "expiry":
            with pytest.raises(InferenceTimeout, match="waiting for a batch"):
                await batcher.run(*requests[2], None, executor, loop.time() + 0.1)
        else:
            queued = asyncio.ensure_future(batcher.run(*requests[2], None, executor, loop.time() + LONG_S))
            await asyncio.sleep(0.05)  # loop timers fire in order: its delay timer has fired by now
            assert batcher.status()["queued"] == 1
            queued.cancel()
            await asyncio.wait({queued}, timeout=HOLD_LIMIT_S)
            assert queued.cancelled()
        assert batcher.status()["queued"] == 0
        gate.release.set()
        await asyncio.gather(*held)
        # nothing runs and nothing waits: a lone request waits for its own delay, as on an idle batcher
        lone = asyncio.ensure_future(batcher.run(*requests[3], None, executor, loop.time() + HOLD_LIMIT_S))
        await asyncio.sleep(0)  # its first step: it joins the queue (its delay timer cannot fire before this)
        waiting = batcher.status()
        return waiting, await lone

    waiting, got = settle(scenario)
    assert (waiting["queued"], waiting["running"], waiting["batches"]) == (1, 0, 1)
    assert_same_answer(got, model.run(requests[3][0]))
    assert stand_in.rows == [2, 1] and faults.draws == 2


# --- failures -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("before_run", "message"), [
    (raising(InferenceFailed("onnxruntime failed: boom")), "onnxruntime failed: boom"),
    (raising(RuntimeError("kaput")), "batch run failed: kaput"),
    (FaultInjector(Fault(version="1", error_percent=100)).before_run(), "injected fault"),
], ids=["inference-failed", "other-error", "fault-injection"])
def test_a_runtime_failure_fails_every_request_of_its_batch_only(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        before_run: BeforeRun, message: str) -> None:
    requests = [validated(validator, rows) for rows in applications(3)]
    faults = FaultQueue(before_run)  # the first batch fails; the one after it runs undisturbed
    batcher = Batcher(model, max_batch_size=64, max_queue_delay_s=0.02, faults=faults.draw)

    async def scenario() -> tuple[list[Any], list[dict[str, np.ndarray]]]:
        loop = asyncio.get_running_loop()
        failed = await asyncio.gather(*(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S)
                                        for feeds, rows in requests), return_exceptions=True)
        answered = await asyncio.gather(*(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S)
                                          for feeds, rows in requests))
        return failed, answered

    failed, answered = settle(scenario)
    assert all(isinstance(e, InferenceFailed) and message in str(e) for e in failed), failed
    assert len({id(e) for e in failed}) == len(failed)  # one instance per request: each takes its own fallback
    for (feeds, _), got in zip(requests, answered, strict=True):
        assert_same_answer(got, model.run(feeds))
    assert batcher.status()["batches"] == 2 and batcher.status()["running"] == 0 and faults.draws == 2


def test_a_fault_injector_draws_once_per_batch(model: OnnxModel, validator: RequestValidator,
                                               executor: ThreadPoolExecutor) -> None:
    """As the registry wires it: `faults=FaultInjector.before_run`, one disturbance per model call."""
    requests = [validated(validator, rows) for rows in applications(6)]
    injector = FaultInjector(Fault(version="1", error_percent=100))
    drawn: list[BeforeRun | None] = []

    def faults() -> BeforeRun | None:
        drawn.append(injector.before_run())
        return drawn[-1]

    batcher = Batcher(model, max_batch_size=64, max_queue_delay_s=0.02, faults=faults)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S)
                                           for feeds, rows in requests), return_exceptions=True))

    failed = settle(scenario)
    assert all(isinstance(e, InferenceFailed) and "injected fault" in str(e) for e in failed), failed
    assert len({id(e) for e in failed}) == len(failed)
    assert batcher.status()["batches"] == 1 and len(drawn) == 1 and drawn[0] is not None


def test_a_batch_does_not_inherit_the_fault_of_the_batch_before_it(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(3)]
    faulty = gates(fail=InferenceFailed("injected fault (policy `faults`)"))
    faults = FaultQueue(faulty)  # only the first batch draws a fault
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0, faults=faults.draw)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(batcher.run(*requests[0], None, executor, loop.time() + LONG_S))
        await entered(faulty)
        later = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S))
                 for feeds, rows in requests[1:]]  # they queue behind the faulty batch, and form the next one
        await until(lambda: batcher.status()["queued"] == 2)
        faulty.release.set()
        return list(await asyncio.gather(first, *later, return_exceptions=True))

    first, *later = settle(scenario)
    assert isinstance(first, InferenceFailed) and "injected fault" in str(first)
    for (feeds, _), got in zip(requests[1:], later, strict=True):
        assert not isinstance(got, BaseException), got
        assert_same_answer(got, model.run(feeds))
    assert stand_in.rows == [1, 2]
    assert faults.draws == 2 and len(faulty.controls) == 1  # the second batch drew its own (no) fault


# --- max_queue_delay_ms: 0 --------------------------------------------------------------------

def test_without_a_delay_a_lone_request_runs_at_once(model: OnnxModel, validator: RequestValidator,
                                                     executor: ThreadPoolExecutor) -> None:
    feeds, rows = validated(validator, [application(3)])
    batcher = Batcher(model, max_batch_size=64, max_queue_delay_s=0.0)

    async def scenario() -> tuple[dict[str, np.ndarray], dict[str, float | int]]:
        loop = asyncio.get_running_loop()
        run = asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S))
        await asyncio.sleep(0)  # the request's first step: it joins the queue and its batch starts
        started = batcher.status()
        return await run, started

    got, started = settle(scenario)
    assert started["running"] == 1 and started["queued"] == 0 and started["batches"] == 1
    assert_same_answer(got, model.run(feeds))
    assert batcher.status()["batches"] == 1 and batcher.status()["max_queue_delay_ms"] == 0


def test_without_a_delay_requests_arriving_during_a_run_form_the_next_batch(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(6)]
    gate = gates()
    faults = FaultQueue(gate)  # the first request's batch is held; the next batch runs undisturbed
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0, faults=faults.draw)

    async def scenario() -> list[dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(batcher.run(*requests[0], None, executor, loop.time() + LONG_S))]
        await entered(gate)
        tasks += [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S))
                  for feeds, rows in requests[1:]]
        await until(lambda: batcher.status()["queued"] == 5)
        assert batcher.status()["batches"] == 1
        gate.release.set()
        return await asyncio.gather(*tasks)

    answers = settle(scenario)
    for (feeds, _), got in zip(requests, answers, strict=True):
        assert_same_answer(got, model.run(feeds))
    status = batcher.status()
    assert status["batches"] == 2 and status["rows"] == 6 and status["mean_rows"] == 3.0
    assert stand_in.rows == [1, 5] and faults.draws == 2


# --- through the real server --------------------------------------------------------------------

FAULTS_ON = {"GATEWAY_ALLOW_FAULT_INJECTION": "true"}


@pytest.fixture(scope="module")
def model_v2() -> OnnxModel:
    entry = ModelRepository(MODELS, RuntimeOptions()).load_version(MODEL, "2")
    assert entry.ready and entry.model is not None, entry.reason
    return entry.model


async def post_all(url: str, bodies: list[dict[str, Any]], version: str = "1") -> list[httpx.Response]:
    """POST every body at once to one version (one connection each)."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=HOLD_LIMIT_S * 3, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"/v2/models/{MODEL}/versions/{version}/infer", json=body)
                                      for body in bodies))


def version_status(url: str, version: str) -> dict[str, Any]:
    (model,) = httpx.get(f"{url}/status", timeout=HOLD_LIMIT_S).json()["models"]
    (entry,) = [v for v in model["versions"] if v["version"] == version]
    return dict(entry)


def assert_model_answer(response: httpx.Response, expected: Mapping[str, np.ndarray], version: str = "1") -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == version and "fallback" not in body["parameters"], body
    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == set(expected)
    for name, want in expected.items():
        got = np.asarray(outputs[name]["data"]).reshape(outputs[name]["shape"])
        assert got.shape == want.shape, name
        if want.dtype.kind in "iub":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@dataclass(frozen=True)
class BatchingServer:
    server: RunningServer
    execution: str
    """What the policy's `guard.execution` asks for: `inline` (batches on the event loop) or `thread` (pool)."""


@pytest.fixture(params=["inline", "thread"])
def batching_server(request: pytest.FixtureRequest, repo_copy: tuple[Path, Path],
                    start_server: StartServer) -> BatchingServer:
    """A server whose credit-risk policy batches, inline or on the pool (with a deadline long enough for a
    loaded CI box)."""
    models, policies = repo_copy
    patch_policy(policies, MODEL, batching={"max_batch_size": 8, "max_queue_delay_ms": 5},
                 guard={"timeout_ms": 10000, "execution": request.param})
    return BatchingServer(start_server(models, policies), request.param)


@pytest.mark.e2e
def test_e2e_concurrent_requests_are_batched_and_answered_like_single_runs(
        batching_server: BatchingServer, model: OnnxModel, validator: RequestValidator) -> None:
    url = batching_server.server.url
    requests = applications(40)
    responses = asyncio.run(post_all(url, [v2_body(rows) for rows in requests]))
    for rows, response in zip(requests, responses, strict=True):
        assert_model_answer(response, model.run(validated(validator, rows)[0]))
    status = version_status(url, "1")
    assert status["execution"] == batching_server.execution
    batching = status["batching"]
    assert batching["max_batch_size"] == 8 and batching["max_queue_delay_ms"] == 5
    assert batching["rows"] == sum(len(rows) for rows in requests)
    assert batching["batches"] < len(requests)  # some requests shared a run
    assert batching["mean_rows"] > 1
    assert batching["queued"] == 0 and batching["running"] == 0


@pytest.mark.e2e
def test_e2e_an_invalid_request_among_batched_ones_fails_alone(
        batching_server: BatchingServer, model: OnnxModel, validator: RequestValidator) -> None:
    url = batching_server.server.url
    requests = applications(20)
    bad = 7
    bodies = [v2_body(rows) for rows in requests]
    bodies[bad] = v2_body([{**requests[bad][0], "age": 5}, *requests[bad][1:]])  # schema: age >= 18
    responses = asyncio.run(post_all(url, bodies))
    assert responses[bad].status_code == 422, responses[bad].text
    assert "age" in responses[bad].text
    for i, (rows, response) in enumerate(zip(requests, responses, strict=True)):
        if i != bad:
            assert_model_answer(response, model.run(validated(validator, rows)[0]))
    batching = version_status(url, "1")["batching"]
    assert batching["rows"] == sum(len(rows) for i, rows in enumerate(requests) if i != bad)


@pytest.mark.e2e
def test_e2e_without_a_batching_policy_only_inline_versions_batch(
        repo_copy: tuple[Path, Path], start_server: StartServer, model: OnnxModel, model_v2: OnnxModel,
        validator: RequestValidator) -> None:
    models, policies = repo_copy
    # fault injection (disturbing no call) keeps version 1 on the pool; version 2 runs inline
    patch_policy(policies, MODEL, guard={"timeout_ms": 10000, "execution": "inline"},
                 faults=[{"version": "1", "delay_ms": 1, "delay_percent": 0}])
    assert "batching" not in (policies / f"{MODEL}.yaml").read_text()
    url = start_server(models, policies, env=FAULTS_ON).url
    pool, inline = version_status(url, "1"), version_status(url, "2")
    assert pool["execution"] == "thread" and pool["faults"] is not None and "batching" not in pool
    assert inline["execution"] == "inline" and inline["faults"] is None
    assert inline["batching"]["max_batch_size"] == INLINE_MAX_BATCH
    assert inline["batching"]["max_queue_delay_ms"] == 0 and inline["batching"]["batches"] == 0

    requests = applications(20)
    v2_validator = RequestValidator(model_v2.signature, load_policy(policies / f"{MODEL}.yaml").policy.input_schema,
                                    max_listed=100)
    for version, served_by, check in (("2", model_v2, v2_validator), ("1", model, validator)):
        responses = asyncio.run(post_all(url, [v2_body(rows) for rows in requests], version))
        for rows, response in zip(requests, responses, strict=True):
            assert_model_answer(response, served_by.run(validated(check, rows)[0]), version)
    batching = version_status(url, "2")["batching"]
    assert batching["rows"] == sum(len(rows) for rows in requests)
    assert 1 <= batching["batches"] <= len(requests)
    assert batching["queued"] == 0 and batching["running"] == 0
    assert "batching" not in version_status(url, "1")


@pytest.mark.e2e
def test_e2e_a_pool_batcher_draws_the_versions_rehearsal_faults(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    patch_policy(policies, MODEL, batching={"max_batch_size": 8, "max_queue_delay_ms": 5},
                 guard={"timeout_ms": 10000, "breaker": {"fail_max": 10_000, "reset_timeout_s": 30}},
                 faults=[{"version": "1", "error_percent": 100}])
    url = start_server(models, policies, env=FAULTS_ON).url
    requests = applications(12)
    responses = asyncio.run(post_all(url, [v2_body(rows) for rows in requests]))
    for response in responses:
        assert response.status_code == 200, response.text
        parameters = response.json()["parameters"]
        assert parameters["fallback"] is True and parameters["fallback_reason"] == "runtime_error", parameters
        assert parameters["attempted_version"] == "1"
        assert "injected fault" in parameters["fallback_detail"], parameters
    status = version_status(url, "1")
    assert status["execution"] == "thread" and status["faults"]["error_percent"] == 100
    assert status["batching"]["rows"] == sum(len(rows) for rows in requests)
    assert status["batching"]["running"] == 0
