"""Dynamic batching: Batcher over the real credit-risk model, and batching through the real server."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.05)

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
    batcher = Batcher(model, max_batch_size=4, max_queue_delay_s=0.5)

    async def scenario() -> tuple[BaseException | None, bool, bool, list[dict[str, np.ndarray]]]:
        loop = asyncio.get_running_loop()
        # the 4th request fills the batch, which closes at once with all four in it
        deadlines = [loop.time() + LONG_S, loop.time() + 0.05, loop.time() + LONG_S, loop.time() + LONG_S]
        tasks = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, deadline, gate))
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
    assert batcher.status()["batches"] == 1 and batcher.status()["rows"] == 4


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
    batcher = Batcher(model, max_batch_size=2, max_queue_delay_s=0.5)

    async def scenario() -> tuple[list[Any], bool, dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + 0.1, gate))
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
    assert batcher.status()["batches"] == 2


def test_a_queued_batch_nobody_waits_for_is_never_run(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(3)]
    gate = gates()
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0)

    async def scenario() -> tuple[dict[str, np.ndarray], list[Any]]:
        loop = asyncio.get_running_loop()
        held = asyncio.ensure_future(batcher.run(*requests[0], None, executor, loop.time() + LONG_S, gate))
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
    assert batcher.status()["batches"] == 1


def test_cancelling_one_waiting_client_does_not_break_its_batch_mates(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, rows) for rows in applications(3)]
    gate = gates()
    batcher = Batcher(model, max_batch_size=6, max_queue_delay_s=0.5)

    async def scenario() -> tuple[bool, list[dict[str, np.ndarray]]]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S, gate))
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
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0)

    async def scenario() -> list[dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(batcher.run(*requests[0], None, executor, loop.time() + LONG_S, gate))]
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


@pytest.mark.xfail(strict=True, reason="Batcher.run only cancels an abandoned batch's run when the last "
                                       "request timed out, not when it was cancelled (client went away)")
def test_a_running_batch_whose_clients_all_went_away_is_cancelled(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(2)]
    gate = gates()
    batcher = Batcher(model, max_batch_size=2, max_queue_delay_s=0.5)

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S, gate))
                 for feeds, rows in requests]
        await entered(gate)
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=HOLD_LIMIT_S)
        try:
            return await asyncio.to_thread(gate.controls[0].wait, 1.0)
        finally:
            gate.release.set()
            await until(lambda: batcher.status()["running"] == 0)

    assert settle(scenario)  # like OnnxModel.predict, whose run is cancelled when its caller is


@pytest.mark.xfail(strict=True, reason="Batcher leaves _due set when the queue empties by expiry (or client "
                                       "cancellation) after its delay passed, so the next lone request never "
                                       "starts a delay timer and waits for its deadline")
def test_a_lone_request_after_the_queue_emptied_by_expiry_still_runs(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(4)]
    gate = gates()
    batcher = Batcher(model, max_batch_size=2, max_queue_delay_s=0.01)

    async def scenario() -> Any:
        loop = asyncio.get_running_loop()
        held = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S, gate))
                for feeds, rows in requests[:2]]  # a full batch: it runs at once, and is held
        await entered(gate)
        # this one's delay passes while the pool is busy; then its deadline passes in the queue
        with pytest.raises(InferenceTimeout, match="waiting for a batch"):
            await batcher.run(*requests[2], None, executor, loop.time() + 0.1)
        gate.release.set()
        await asyncio.gather(*held)
        # nothing runs and nothing waits: a lone request runs after its 10 ms delay
        return await asyncio.gather(batcher.run(*requests[3], None, executor, loop.time() + 2.0),
                                    return_exceptions=True)

    (got,) = settle(scenario)
    assert not isinstance(got, BaseException), got
    assert_same_answer(got, model.run(requests[3][0]))


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
    batcher = Batcher(model, max_batch_size=64, max_queue_delay_s=0.02)

    async def scenario() -> tuple[list[Any], list[dict[str, np.ndarray]]]:
        loop = asyncio.get_running_loop()
        failed = await asyncio.gather(*(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S, before_run)
                                        for feeds, rows in requests), return_exceptions=True)
        answered = await asyncio.gather(*(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S)
                                          for feeds, rows in requests))
        return failed, answered

    failed, answered = settle(scenario)
    assert all(isinstance(e, InferenceFailed) and message in str(e) for e in failed), failed
    assert len({id(e) for e in failed}) == len(failed)  # one instance per request: each takes its own fallback
    for (feeds, _), got in zip(requests, answered, strict=True):
        assert_same_answer(got, model.run(feeds))
    assert batcher.status()["batches"] == 2 and batcher.status()["running"] == 0


@pytest.mark.xfail(strict=True, reason="Batcher._finished dispatches the requests that queued meanwhile with "
                                       "the before_run of the batch that just finished")
def test_a_batch_does_not_inherit_the_fault_of_the_batch_before_it(
        model: OnnxModel, validator: RequestValidator, executor: ThreadPoolExecutor,
        gates: Callable[..., Gate]) -> None:
    requests = [validated(validator, [application(i)]) for i in range(3)]
    faulty = gates(fail=InferenceFailed("injected fault (policy `faults`)"))
    batcher = Batcher(model, max_batch_size=64, max_queue_delay_s=0.0)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(batcher.run(*requests[0], None, executor, loop.time() + LONG_S, faulty))
        await entered(faulty)
        later = [asyncio.ensure_future(batcher.run(feeds, rows, None, executor, loop.time() + LONG_S))
                 for feeds, rows in requests[1:]]  # these requests drew no fault
        await until(lambda: batcher.status()["queued"] == 2)
        faulty.release.set()
        return list(await asyncio.gather(first, *later, return_exceptions=True))

    first, *later = settle(scenario)
    assert isinstance(first, InferenceFailed)
    for (feeds, _), got in zip(requests[1:], later, strict=True):
        assert not isinstance(got, BaseException), got
        assert_same_answer(got, model.run(feeds))


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
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0)

    async def scenario() -> list[dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(batcher.run(*requests[0], None, executor, loop.time() + LONG_S, gate))]
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
    assert stand_in.rows == [1, 5]


# --- through the real server --------------------------------------------------------------------

async def post_all(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body at once to version 1 (one connection each)."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=HOLD_LIMIT_S * 3, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"/v2/models/{MODEL}/versions/1/infer", json=body)
                                      for body in bodies))


def version_status(url: str, version: str) -> dict[str, Any]:
    (model,) = httpx.get(f"{url}/status", timeout=HOLD_LIMIT_S).json()["models"]
    (entry,) = [v for v in model["versions"] if v["version"] == version]
    return dict(entry)


def assert_model_answer(response: httpx.Response, expected: Mapping[str, np.ndarray]) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "1" and "fallback" not in body["parameters"], body
    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == set(expected)
    for name, want in expected.items():
        got = np.asarray(outputs[name]["data"]).reshape(outputs[name]["shape"])
        assert got.shape == want.shape, name
        if want.dtype.kind in "iub":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture
def batching_server(repo_copy: tuple[Path, Path], start_server: StartServer) -> RunningServer:
    """A server whose credit-risk policy batches (and whose deadline is long enough for a loaded CI box)."""
    models, policies = repo_copy
    patch_policy(policies, MODEL, batching={"max_batch_size": 8, "max_queue_delay_ms": 5},
                 guard={"timeout_ms": 10000})
    return start_server(models, policies)


@pytest.mark.e2e
def test_e2e_concurrent_requests_are_batched_and_answered_like_single_runs(
        batching_server: RunningServer, model: OnnxModel, validator: RequestValidator) -> None:
    requests = applications(40)
    responses = asyncio.run(post_all(batching_server.url, [v2_body(rows) for rows in requests]))
    for rows, response in zip(requests, responses, strict=True):
        assert_model_answer(response, model.run(validated(validator, rows)[0]))
    status = version_status(batching_server.url, "1")
    assert status["execution"] == "batch"
    batching = status["batching"]
    assert batching["max_batch_size"] == 8 and batching["max_queue_delay_ms"] == 5
    assert batching["rows"] == sum(len(rows) for rows in requests)
    assert batching["batches"] < len(requests)  # some requests shared a run
    assert batching["mean_rows"] > 1
    assert batching["queued"] == 0 and batching["running"] == 0


@pytest.mark.e2e
def test_e2e_an_invalid_request_among_batched_ones_fails_alone(
        batching_server: RunningServer, model: OnnxModel, validator: RequestValidator) -> None:
    requests = applications(20)
    bad = 7
    bodies = [v2_body(rows) for rows in requests]
    bodies[bad] = v2_body([{**requests[bad][0], "age": 5}, *requests[bad][1:]])  # schema: age >= 18
    responses = asyncio.run(post_all(batching_server.url, bodies))
    assert responses[bad].status_code == 422, responses[bad].text
    assert "age" in responses[bad].text
    for i, (rows, response) in enumerate(zip(requests, responses, strict=True)):
        if i != bad:
            assert_model_answer(response, model.run(validated(validator, rows)[0]))
    batching = version_status(batching_server.url, "1")["batching"]
    assert batching["rows"] == sum(len(rows) for i, rows in enumerate(requests) if i != bad)
