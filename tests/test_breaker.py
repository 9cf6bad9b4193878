"""AsyncBreaker: pybreaker's state machine driven from async code, with an injected clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from gateway.breaker import CLOSED, HALF_OPEN, OPEN, AsyncBreaker, Ticket
from gateway.errors import (
    CircuitOpen,
    ClientError,
    GatewayError,
    InferenceFailed,
    InferenceTimeout,
    ModelNotFound,
    Overloaded,
)

Transition = tuple[str, str, str]


class Clock:
    """A fake monotonic clock: a mutable float read through a closure."""

    def __init__(self, start: float = 1000.0) -> None:
        now = [start]
        self.now: Callable[[], float] = lambda: now[0]

        def advance(seconds: float) -> None:
            now[0] += seconds

        self.advance = advance


def make(fail_max: int = 3, reset: float = 30.0) -> tuple[AsyncBreaker, Clock, list[Transition]]:
    clock = Clock()
    changes: list[Transition] = []
    breaker = AsyncBreaker("credit-risk/1", fail_max, reset, clock=clock.now,
                           on_change=lambda *change: changes.append(change))
    return breaker, clock, changes


def fail(breaker: AsyncBreaker, error: BaseException | None = None) -> None:
    breaker.record(breaker.admit(), error or InferenceFailed("onnxruntime failed"))


def succeed(breaker: AsyncBreaker) -> None:
    breaker.record(breaker.admit(), None)


def trip(breaker: AsyncBreaker) -> None:
    for _ in range(breaker.fail_max):
        fail(breaker)
    assert breaker.state == OPEN


def test_state_names_are_pybreakers() -> None:
    assert (CLOSED, OPEN, HALF_OPEN) == ("closed", "open", "half-open")


def test_a_new_breaker_is_closed_and_admits_ordinary_calls() -> None:
    breaker, _, changes = make()
    assert breaker.state == CLOSED
    tickets = [breaker.admit() for _ in range(10)]
    assert tickets == [Ticket(trial=False)] * 10
    assert changes == []


@pytest.mark.parametrize("error", [InferenceFailed("boom"), InferenceTimeout("late")], ids=["failed", "timeout"])
def test_it_opens_after_fail_max_counted_failures(error: GatewayError) -> None:
    breaker, _, changes = make(fail_max=3)
    fail(breaker, error)
    fail(breaker, error)
    assert breaker.state == CLOSED
    assert breaker.status()["failures"] == 2
    fail(breaker, error)
    assert breaker.state == OPEN
    assert changes == [("credit-risk/1", CLOSED, OPEN)]


def test_timeouts_and_runtime_failures_count_together() -> None:
    breaker, _, _ = make(fail_max=2)
    fail(breaker, InferenceTimeout("late"))
    fail(breaker, InferenceFailed("boom"))
    assert breaker.state == OPEN


@pytest.mark.parametrize("error", [
    ClientError("bad request"), ModelNotFound("no such model"), Overloaded("busy"), CircuitOpen("open"),
], ids=lambda e: type(e).__name__)
def test_errors_that_do_not_count_against_the_breaker_never_trip_it(error: GatewayError) -> None:
    assert error.counts_against_breaker is False
    breaker, _, changes = make(fail_max=2)
    for _ in range(10):
        fail(breaker, error)
    assert breaker.state == CLOSED
    assert breaker.status()["failures"] == 0
    assert changes == []


def test_an_open_breaker_rejects_until_the_reset_timeout_has_passed_on_the_clock() -> None:
    breaker, clock, _ = make(fail_max=1, reset=30.0)
    trip(breaker)
    with pytest.raises(CircuitOpen, match=r"circuit breaker of credit-risk/1 is open \(retry in 30\.0 s\)"):
        breaker.admit()
    clock.advance(20.0)
    with pytest.raises(CircuitOpen, match=r"retry in 10\.0 s"):
        breaker.admit()
    clock.advance(9.99)
    with pytest.raises(CircuitOpen):
        breaker.admit()
    assert breaker.state == OPEN
    clock.advance(0.01)
    assert breaker.admit() == Ticket(trial=True)
    assert breaker.state == HALF_OPEN


def test_rejected_calls_are_not_failures() -> None:
    breaker, clock, _ = make(fail_max=1, reset=30.0)
    trip(breaker)
    for _ in range(5):
        with pytest.raises(CircuitOpen):
            breaker.admit()
    clock.advance(30.0)
    assert breaker.admit().trial  # the rejections did not push the reset further away


def test_half_open_admits_exactly_one_trial_at_a_time() -> None:
    breaker, clock, _ = make(fail_max=1, reset=5.0)
    trip(breaker)
    clock.advance(5.0)
    trial = breaker.admit()
    assert trial.trial
    for _ in range(3):
        with pytest.raises(CircuitOpen, match="half-open and a trial request is in flight"):
            breaker.admit()
    clock.advance(100.0)  # time alone does not admit a second trial
    with pytest.raises(CircuitOpen):
        breaker.admit()
    assert breaker.state == HALF_OPEN


def test_a_successful_trial_closes_the_breaker() -> None:
    breaker, clock, changes = make(fail_max=2, reset=5.0)
    trip(breaker)
    clock.advance(5.0)
    breaker.record(breaker.admit(), None)
    assert breaker.state == CLOSED
    assert breaker.status()["failures"] == 0
    assert [breaker.admit() for _ in range(3)] == [Ticket(trial=False)] * 3
    assert changes == [("credit-risk/1", CLOSED, OPEN), ("credit-risk/1", OPEN, HALF_OPEN),
                       ("credit-risk/1", HALF_OPEN, CLOSED)]
    fail(breaker)  # a fresh count: one failure is not enough to trip again
    assert breaker.state == CLOSED


@pytest.mark.parametrize("error", [InferenceFailed("boom"), InferenceTimeout("late")], ids=["failed", "timeout"])
def test_a_failed_trial_reopens_for_a_full_reset_timeout(error: GatewayError) -> None:
    breaker, clock, changes = make(fail_max=3, reset=10.0)
    trip(breaker)
    clock.advance(10.0)
    trial = breaker.admit()
    clock.advance(4.0)  # the trial took a while
    breaker.record(trial, error)
    assert breaker.state == OPEN
    clock.advance(9.9)  # 13.9 s after the first opening, but only 9.9 s after the re-opening
    with pytest.raises(CircuitOpen, match=r"retry in 0\.1 s"):
        breaker.admit()
    clock.advance(0.1)
    assert breaker.admit().trial
    assert changes[-3:] == [("credit-risk/1", OPEN, HALF_OPEN), ("credit-risk/1", HALF_OPEN, OPEN),
                            ("credit-risk/1", OPEN, HALF_OPEN)]


def test_successes_reset_the_failure_count() -> None:
    breaker, _, _ = make(fail_max=3)
    fail(breaker)
    fail(breaker)
    assert breaker.status()["failures"] == 2
    succeed(breaker)
    assert breaker.status()["failures"] == 0
    fail(breaker)
    fail(breaker)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN


@pytest.mark.parametrize("outcome", [None, InferenceFailed("boom")], ids=["success", "failure"])
def test_outcomes_of_calls_admitted_before_the_trip_are_ignored(outcome: BaseException | None) -> None:
    breaker, clock, changes = make(fail_max=2, reset=10.0)
    early = [breaker.admit() for _ in range(4)]
    breaker.record(early[0], InferenceFailed("boom"))
    breaker.record(early[1], InferenceFailed("boom"))
    assert breaker.state == OPEN
    breaker.record(early[2], outcome)  # neither closes it nor re-opens / extends it
    assert breaker.state == OPEN
    clock.advance(10.0)
    trial = breaker.admit()
    assert trial.trial
    breaker.record(early[3], outcome)  # nor does it settle the half-open state in place of the trial
    assert breaker.state == HALF_OPEN
    with pytest.raises(CircuitOpen):
        breaker.admit()
    breaker.record(trial, None)
    assert breaker.state == CLOSED
    assert changes == [("credit-risk/1", CLOSED, OPEN), ("credit-risk/1", OPEN, HALF_OPEN),
                       ("credit-risk/1", HALF_OPEN, CLOSED)]


def test_a_pre_trip_call_that_fails_after_recovery_does_not_reopen_the_breaker() -> None:
    breaker, clock, _ = make(fail_max=1, reset=0.5)
    slow = breaker.admit()  # e.g. a request with a 1 s deadline
    fail(breaker)  # another call trips the breaker
    clock.advance(0.5)
    breaker.record(breaker.admit(), None)  # the trial succeeds: closed again
    assert breaker.state == CLOSED
    breaker.record(slow, InferenceTimeout("late"))  # admitted before the trip: says nothing new
    assert breaker.state == CLOSED


def test_release_frees_the_trial() -> None:
    breaker, clock, changes = make(fail_max=1, reset=5.0)
    trip(breaker)
    clock.advance(5.0)
    trial = breaker.admit()
    breaker.release(trial)  # e.g. the client went away before the model ran
    assert breaker.state == HALF_OPEN
    second = breaker.admit()
    assert second.trial
    with pytest.raises(CircuitOpen):
        breaker.admit()
    breaker.record(second, None)
    assert breaker.state == CLOSED
    assert changes.count(("credit-risk/1", OPEN, HALF_OPEN)) == 1


def test_releasing_an_ordinary_ticket_changes_nothing() -> None:
    breaker, _, changes = make(fail_max=2)
    fail(breaker)
    breaker.release(breaker.admit())
    assert breaker.status()["failures"] == 1
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN
    assert changes == [("credit-risk/1", CLOSED, OPEN)]


def test_the_listener_sees_every_transition_in_order() -> None:
    breaker, clock, changes = make(fail_max=2, reset=1.0)
    trip(breaker)
    clock.advance(1.0)
    breaker.record(breaker.admit(), InferenceTimeout("late"))
    clock.advance(1.0)
    breaker.record(breaker.admit(), None)
    trip(breaker)
    name = "credit-risk/1"
    assert changes == [
        (name, CLOSED, OPEN), (name, OPEN, HALF_OPEN), (name, HALF_OPEN, OPEN),
        (name, OPEN, HALF_OPEN), (name, HALF_OPEN, CLOSED), (name, CLOSED, OPEN),
    ]


def test_without_a_listener_transitions_still_happen() -> None:
    clock = Clock()
    breaker = AsyncBreaker("m/1", 1, 2.0, clock=clock.now)
    fail(breaker)
    assert breaker.state == OPEN
    clock.advance(2.0)
    breaker.record(breaker.admit(), None)
    assert breaker.state == CLOSED


def test_status() -> None:
    breaker, clock, _ = make(fail_max=4, reset=12.5)
    assert breaker.status() == {"state": "closed", "failures": 0, "fail_max": 4, "reset_timeout_s": 12.5}
    fail(breaker)
    assert breaker.status() == {"state": "closed", "failures": 1, "fail_max": 4, "reset_timeout_s": 12.5}
    for _ in range(3):
        fail(breaker)
    assert breaker.status() == {"state": "open", "failures": 4, "fail_max": 4, "reset_timeout_s": 12.5}
    clock.advance(12.5)
    breaker.admit()
    assert breaker.status()["state"] == "half-open"


def test_record_accepts_any_error_as_an_outcome() -> None:
    breaker, _, _ = make(fail_max=3)
    breaker.record(breaker.admit(), RuntimeError("unexpected"))  # typed BaseException | None
    assert breaker.status()["failures"] == 1


def test_the_lock_is_not_held_across_the_await_and_calls_are_not_serialised() -> None:
    calls = 8
    breaker, _, _ = make(fail_max=calls, reset=30.0)
    between = 0
    peak = 0

    async def call(gate: asyncio.Event, all_in: asyncio.Event) -> None:
        nonlocal between, peak
        ticket = breaker.admit()
        between += 1
        peak = max(peak, between)
        if between == calls:
            all_in.set()
        await gate.wait()
        between -= 1
        breaker.record(ticket, InferenceFailed("boom"))

    def lock_is_free() -> bool:
        got: list[bool] = []

        def grab() -> None:
            acquired = breaker.breaker._lock.acquire(timeout=0.2)
            got.append(acquired)
            if acquired:
                breaker.breaker._lock.release()

        thread = threading.Thread(target=grab)
        thread.start()
        thread.join(0.5)
        return got == [True]

    async def scenario() -> None:
        gate, all_in = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(call(gate, all_in)) for _ in range(calls)]
        await asyncio.wait_for(all_in.wait(), timeout=2.0)
        assert between == calls  # every call is between admit() and record() at the same time
        assert lock_is_free()  # ...and none of them holds pybreaker's lock while it waits
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=2.0)

    asyncio.run(scenario())
    assert peak == calls
    assert between == 0
    assert breaker.state == OPEN  # all eight outcomes were counted once they arrived
    assert breaker.status()["failures"] == calls
