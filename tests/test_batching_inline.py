"""Inline batching: a Batcher with `inline=InlineRunner()` runs its batches on the event loop.

A dispatch is scheduled with loop.call_soon, so every request that reaches the batcher in the same
loop turn shares one run (at most max_batch_size rows per run); with max_queue_delay_s > 0 a timer
gathers requests of several turns first. The run gets the latest deadline of its requests (the
runner's watchdog terminates it then), and every request still has its own expiry timer.

Scheduling here is counted in loop turns, never in elapsed time: a task created with
ensure_future takes its first step in the next turn, and a callback scheduled with call_soon
during a turn runs in the turn after it (before any timer that fell due meanwhile).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar, cast

import numpy as np
import pytest

from gateway.batching import Batcher
from gateway.errors import InferenceFailed, InferenceTimeout
from gateway.policy import load_policy
from gateway.repository import ModelRepository
from gateway.runtime import BeforeRun, InlineRunner, OnnxModel, RunControl, RuntimeOptions
from gateway.validation import RequestValidator
from tests.conftest import MODEL, MODELS, POLICIES
from tests.test_batching import (
    HOLD_LIMIT_S,
    LONG_S,
    FaultQueue,
    Feeds,
    Recording,
    application,
    applications,
    assert_same_answer,
    recording,
    settle,
    validated,
)

T = TypeVar("T")

FAIL_FAST_S = 2.0
"""Deadline of requests whose run fails at once: a batcher that lost them fails the test within it."""
DELAY_S = 0.2
"""A queue delay far longer than the few loop turns a test takes to submit its requests."""


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
def runner() -> Iterator[InlineRunner]:
    inline = InlineRunner()
    yield inline
    inline.close()


class UnusedPool(ThreadPoolExecutor):
    """The executor handed to an inline batcher's `run`: using it fails the test."""

    def __init__(self) -> None:
        super().__init__(1, thread_name_prefix="test-inline-unused")

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        raise AssertionError("an inline batcher sent a run to the worker pool")


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    unused = UnusedPool()
    yield unused
    unused.shutdown(wait=True)


class OnThread(Recording):
    """A Recording that also notes the thread each run happened on."""

    def __init__(self, model: OnnxModel) -> None:
        super().__init__(model)
        self.threads: list[int] = []

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
            control: RunControl | None = None, before_run: BeforeRun | None = None) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        return super().run(feeds, outputs, control, before_run)


class Failing(Recording):
    """A Recording whose runs number `failing` (0-based) raise a fresh copy of `error` instead of answering."""

    def __init__(self, model: OnnxModel, error: Exception, failing: set[int]) -> None:
        super().__init__(model)
        self.error = error
        self.failing = failing

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
            control: RunControl | None = None, before_run: BeforeRun | None = None) -> dict[str, np.ndarray]:
        answer = super().run(feeds, outputs, control, before_run)
        if len(self.rows) - 1 in self.failing:
            raise type(self.error)(*self.error.args)
        return answer


class Overrunning(Recording):
    """A Recording whose run lasts until the runner's watchdog terminates it (as onnxruntime stops at
    its next node), then fails the way OnnxModel.run does; notes when it was terminated."""

    def __init__(self, model: OnnxModel) -> None:
        super().__init__(model)
        self.terminated_at: list[float] = []

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
            control: RunControl | None = None, before_run: BeforeRun | None = None) -> dict[str, np.ndarray]:
        self.rows.append(len(next(iter(feeds.values()))))
        assert control is not None
        if control.wait(HOLD_LIMIT_S):
            self.terminated_at.append(time.monotonic())
            raise InferenceFailed("onnxruntime failed: Exiting due to terminate flag being set to true.")
        return self.model.run(feeds, outputs, control, before_run)


def submit(batcher: Batcher, pool: ThreadPoolExecutor, requests: Sequence[tuple[Feeds, int]],
           deadline: float = LONG_S, outputs: Sequence[Sequence[str] | None] | None = None,
           ) -> list[asyncio.Future[dict[str, np.ndarray]]]:
    """Start one task per request; they all reach the batcher in the next loop turn."""
    loop = asyncio.get_running_loop()
    wanted = outputs or [None] * len(requests)
    return [asyncio.ensure_future(batcher.run(feeds, rows, out, pool, loop.time() + deadline))
            for (feeds, rows), out in zip(requests, wanted, strict=True)]


async def next_turn() -> None:
    """Let the loop run one turn: what was scheduled before this call has run when it returns."""
    await asyncio.sleep(0)


# --- one loop turn, one run -----------------------------------------------------------------------

def test_requests_of_one_loop_turn_share_one_run_on_the_loop(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    requests = [validated(validator, rows) for rows in applications(12)]
    wanted: list[Sequence[str] | None] = [None, ["probabilities"], ["label"], ["label", "probabilities"]] * 3
    stand_in = OnThread(model)
    batcher = Batcher(cast(OnnxModel, stand_in), max_batch_size=64, max_queue_delay_s=0.0, inline=runner)

    async def scenario() -> tuple[int, list[dict[str, np.ndarray]]]:
        answers = await asyncio.gather(*submit(batcher, pool, requests, outputs=wanted))
        return threading.get_ident(), list(answers)

    loop_thread, answers = settle(scenario)
    total = sum(rows for _, rows in requests)
    assert stand_in.rows == [total]  # one run for the twelve requests
    assert stand_in.threads == [loop_thread]  # on the event loop (the pool refuses work)
    for (feeds, rows), outputs, got in zip(requests, wanted, answers, strict=True):
        expected = model.run(feeds)
        assert list(got) == list(outputs or expected)
        assert all(len(array) == rows for array in got.values())
        assert_same_answer(got, {name: expected[name] for name in got})
    status = batcher.status()
    assert (status["batches"], status["rows"], status["mean_rows"]) == (1, total, total)
    assert status["queued"] == 0 and status["running"] == 0


def test_a_request_of_the_next_turn_gets_a_run_of_its_own(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    requests = [validated(validator, [application(i)]) for i in range(3)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0, inline=runner)

    async def scenario() -> list[dict[str, np.ndarray]]:
        first = submit(batcher, pool, requests[:2])
        await next_turn()  # the first two join and schedule their run for the turn after
        later = submit(batcher, pool, requests[2:])  # reaches the batcher after that run
        return list(await asyncio.gather(*first, *later))

    answers = settle(scenario)
    for (feeds, _), got in zip(requests, answers, strict=True):
        assert_same_answer(got, model.run(feeds))
    assert stand_in.rows == [2, 1]
    assert batcher.status()["batches"] == 2


def test_max_batch_size_splits_one_turn_into_several_runs(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    requests = [validated(validator, [application(i)]) for i in range(10)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=4, max_queue_delay_s=0.0, inline=runner)

    async def scenario() -> list[dict[str, np.ndarray]]:
        return list(await asyncio.gather(*submit(batcher, pool, requests)))

    answers = settle(scenario)
    for (feeds, _), got in zip(requests, answers, strict=True):
        assert_same_answer(got, model.run(feeds))
    assert stand_in.rows == [4, 4, 2]  # oldest first, at most four rows a run
    status = batcher.status()
    assert (status["batches"], status["rows"], status["queued"]) == (3, 10, 0)


def test_a_request_larger_than_max_batch_size_runs_alone_inline(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    big = validated(validator, [application(i) for i in range(6)])
    small = [validated(validator, [application(i)]) for i in (10, 11)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=4, max_queue_delay_s=0.0, inline=runner)

    async def scenario() -> list[dict[str, np.ndarray]]:
        return list(await asyncio.gather(*submit(batcher, pool, [small[0], big, small[1]])))

    answers = settle(scenario)
    for (feeds, _), got in zip((small[0], big, small[1]), answers, strict=True):
        assert_same_answer(got, model.run(feeds))
    assert stand_in.rows == [1, 6, 1]


# --- max_queue_delay_s > 0 ------------------------------------------------------------------------

def test_with_a_delay_requests_of_several_turns_gather_until_the_timer_fires(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    requests = [validated(validator, rows) for rows in applications(4)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=DELAY_S, inline=runner)

    async def scenario() -> tuple[list[tuple[int, int]], list[dict[str, np.ndarray]]]:
        tasks: list[asyncio.Future[dict[str, np.ndarray]]] = []
        seen = []
        for request in requests:  # one request per loop turn, a few turns in all
            tasks += submit(batcher, pool, [request])
            await next_turn()
            await next_turn()  # the turn after it joined: no run was scheduled
            seen.append((int(batcher.status()["queued"]), int(batcher.status()["batches"])))
        return seen, list(await asyncio.gather(*tasks))

    seen, answers = settle(scenario)
    assert seen == [(1, 0), (2, 0), (3, 0), (4, 0)]  # they waited for the timer, gathering
    for (feeds, _), got in zip(requests, answers, strict=True):
        assert_same_answer(got, model.run(feeds))
    assert stand_in.rows == [sum(rows for _, rows in requests)]
    assert batcher.status()["batches"] == 1


def test_with_a_delay_a_full_batch_runs_without_waiting_for_the_timer(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    requests = [validated(validator, [application(i)]) for i in range(5)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=4, max_queue_delay_s=LONG_S, inline=runner)

    async def scenario() -> tuple[dict[str, float | int], list[dict[str, np.ndarray]]]:
        tasks = submit(batcher, pool, requests[:4])  # four rows: full
        await next_turn()  # they join; the fourth schedules the run
        await next_turn()  # the run
        after_run = batcher.status()
        answers = await asyncio.gather(*tasks)
        tail = submit(batcher, pool, requests[4:])  # alone, it waits for the (long) delay
        await next_turn()
        await next_turn()
        assert batcher.status()["queued"] == 1 and batcher.status()["batches"] == 1
        tail[0].cancel()
        await asyncio.wait(tail, timeout=HOLD_LIMIT_S)
        return after_run, list(answers)

    after_run, answers = settle(scenario)
    assert (after_run["batches"], after_run["queued"]) == (1, 0)
    for (feeds, _), got in zip(requests[:4], answers, strict=True):
        assert_same_answer(got, model.run(feeds))
    assert stand_in.rows == [4]
    assert batcher.status()["queued"] == 0  # the cancelled lone request left the queue


# --- deadlines and cancellation -------------------------------------------------------------------

def test_a_request_past_its_deadline_on_arrival_gets_inference_timeout_and_does_not_join(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    requests = [validated(validator, [application(i)]) for i in range(3)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0, inline=runner)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        deadlines = [loop.time() + LONG_S, loop.time(), loop.time() + LONG_S]
        return list(await asyncio.gather(*(batcher.run(feeds, rows, None, pool, deadline)
                                           for (feeds, rows), deadline in zip(requests, deadlines, strict=True)),
                                         return_exceptions=True))

    first, late, last = settle(scenario)
    assert isinstance(late, InferenceTimeout) and "before the request could join a batch" in str(late)
    assert_same_answer(first, model.run(requests[0][0]))
    assert_same_answer(last, model.run(requests[2][0]))
    assert stand_in.rows == [2]
    assert batcher.status()["rows"] == 2 and runner.terminated == 0


def test_a_request_whose_deadline_passes_before_the_dispatch_gets_inference_timeout_and_does_not_join(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    requests = [validated(validator, [application(i)]) for i in range(3)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=DELAY_S, inline=runner)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        # the middle one's deadline comes long before the delay timer that dispatches the batch
        deadlines = [loop.time() + LONG_S, loop.time() + DELAY_S / 10, loop.time() + LONG_S]
        return list(await asyncio.gather(*(batcher.run(feeds, rows, None, pool, deadline)
                                           for (feeds, rows), deadline in zip(requests, deadlines, strict=True)),
                                         return_exceptions=True))

    first, expired, last = settle(scenario)
    assert isinstance(expired, InferenceTimeout) and "waiting for a batch" in str(expired)
    assert_same_answer(first, model.run(requests[0][0]))
    assert_same_answer(last, model.run(requests[2][0]))
    assert stand_in.rows == [2]
    assert batcher.status()["rows"] == 2 and batcher.status()["queued"] == 0


def test_a_request_whose_deadline_passed_while_the_loop_was_busy_does_not_join(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    requests = [validated(validator, [application(i)]) for i in range(2)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0, inline=runner)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        short = loop.time() + 0.02
        tasks = [asyncio.ensure_future(batcher.run(*requests[0], None, pool, loop.time() + LONG_S)),
                 asyncio.ensure_future(batcher.run(*requests[1], None, pool, short))]
        await next_turn()  # both join; their run is scheduled for the next turn
        while loop.time() < short:  # this turn keeps the loop busy (as other inline runs do) past the deadline
            time.sleep(0.001)
        # the run is dispatched before the expiry timer that fell due meanwhile gets to run
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    answered, expired = settle(scenario)
    assert_same_answer(answered, model.run(requests[0][0]))
    assert isinstance(expired, InferenceTimeout) and "waiting for a batch" in str(expired), expired
    assert stand_in.rows == [1]  # it did not join the run (which would have had its batch-mate's deadline)
    assert batcher.status()["rows"] == 1


def test_the_run_gets_the_latest_deadline_of_its_requests(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    requests = [validated(validator, [application(i)]) for i in range(2)]
    stand_in = Overrunning(model)
    batcher = Batcher(cast(OnnxModel, stand_in), max_batch_size=64, max_queue_delay_s=0.0, inline=runner)

    async def scenario() -> tuple[float, list[Any]]:
        loop = asyncio.get_running_loop()
        deadlines = [loop.time() + 0.05, loop.time() + 0.15]
        outcomes = await asyncio.gather(*(batcher.run(feeds, rows, None, pool, deadline)
                                          for (feeds, rows), deadline in zip(requests, deadlines, strict=True)),
                                        return_exceptions=True)
        return max(deadlines), list(outcomes)

    latest, outcomes = settle(scenario)
    assert stand_in.rows == [2]  # one run for both
    assert len(stand_in.terminated_at) == 1 and stand_in.terminated_at[0] >= latest  # not at the earlier deadline
    assert runner.terminated == 1
    assert all(isinstance(o, InferenceTimeout) and "terminated" in str(o) for o in outcomes), outcomes
    assert outcomes[0] is not outcomes[1]  # one instance per request: each takes its own fallback


def test_a_client_cancelled_before_the_dispatch_is_left_out(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    requests = [validated(validator, [application(i)]) for i in range(3)]
    stand_in, wrapped = recording(model)
    batcher = Batcher(wrapped, max_batch_size=64, max_queue_delay_s=0.0, inline=runner)

    async def scenario() -> tuple[bool, list[dict[str, np.ndarray]]]:
        tasks = submit(batcher, pool, requests)
        await next_turn()  # all three joined; their run is scheduled for the next turn
        tasks[1].cancel()
        await asyncio.wait({tasks[1]}, timeout=HOLD_LIMIT_S)
        return tasks[1].cancelled(), list(await asyncio.gather(tasks[0], tasks[2]))

    cancelled, answers = settle(scenario)
    assert cancelled
    assert_same_answer(answers[0], model.run(requests[0][0]))
    assert_same_answer(answers[1], model.run(requests[2][0]))
    assert stand_in.rows == [2]
    assert batcher.status()["rows"] == 2 and batcher.status()["queued"] == 0


# --- failures -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "expected", "message"), [
    (InferenceFailed("onnxruntime failed: boom"), InferenceFailed, "onnxruntime failed: boom"),
    (InferenceTimeout("deadline passed while the model ran inline; the run was terminated"), InferenceTimeout,
     "terminated"),
    # any other error, as on the pool: never the loop's, and the rest of the turn still runs
    (RuntimeError("kaput"), InferenceFailed, "batch run failed: kaput"),
], ids=["inference-failed", "inference-timeout", "other-error"])
def test_a_runtime_failure_fails_each_request_of_its_batch_with_its_own_exception(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner,
        error: Exception, expected: type[Exception], message: str) -> None:
    requests = [validated(validator, rows) for rows in applications(5)]  # 1+2+3 | 1+2 rows
    stand_in = Failing(model, error, failing={0})
    batcher = Batcher(cast(OnnxModel, stand_in), max_batch_size=6, max_queue_delay_s=0.0, inline=runner)

    async def scenario() -> tuple[list[Any], list[dict[str, np.ndarray]]]:
        outcomes = await asyncio.gather(*submit(batcher, pool, requests, deadline=FAIL_FAST_S),
                                        return_exceptions=True)
        again = await asyncio.gather(*submit(batcher, pool, requests[:3], deadline=FAIL_FAST_S))
        return list(outcomes), list(again)

    outcomes, again = settle(scenario)
    assert stand_in.rows == [6, 3, 6]  # the turn ran in two batches; the next turn in one
    failed, answered = outcomes[:3], outcomes[3:]
    assert all(isinstance(e, expected) and message in str(e) for e in failed), failed
    assert len({id(e) for e in failed}) == len(failed) and error not in failed  # each its own instance
    for (feeds, _), got in zip(requests[3:], answered, strict=True):  # the other batch of the turn is answered
        assert not isinstance(got, BaseException), got
        assert_same_answer(got, model.run(feeds))
    for (feeds, _), got in zip(requests[:3], again, strict=True):  # and the batcher goes on
        assert_same_answer(got, model.run(feeds))
    assert batcher.status()["batches"] == 3 and runner.terminated == 0


def test_inline_batches_draw_no_rehearsal_faults(
        model: OnnxModel, validator: RequestValidator, pool: ThreadPoolExecutor, runner: InlineRunner) -> None:
    """Injected delays sleep, which must never happen on the event loop: faults are for pool batches only."""
    requests = [validated(validator, [application(i)]) for i in range(3)]
    faults = FaultQueue()
    batcher = Batcher(model, max_batch_size=64, max_queue_delay_s=0.0, inline=runner, faults=faults.draw)

    async def scenario() -> list[dict[str, np.ndarray]]:
        return list(await asyncio.gather(*submit(batcher, pool, requests)))

    answers = settle(scenario)
    for (feeds, _), got in zip(requests, answers, strict=True):
        assert_same_answer(got, model.run(feeds))
    assert batcher.status()["batches"] == 1 and faults.draws == 0
