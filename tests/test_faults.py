"""Fault injection: deterministic draws decide delays and failures; delays wake up on cancel."""

from __future__ import annotations

import threading
import time

import pytest

from gateway.errors import InferenceFailed
from gateway.faults import FaultInjector
from gateway.policy import Fault
from gateway.runtime import BeforeRun, RunControl


def injector(draw: float, delay_ms: float = 0.0, delay_percent: float = 0.0,
             error_percent: float = 0.0) -> FaultInjector:
    fault = Fault(version="1", delay_ms=delay_ms, delay_percent=delay_percent, error_percent=error_percent)
    return FaultInjector(fault, draw=lambda: draw)


def disturbance(fi: FaultInjector) -> BeforeRun:
    before_run = fi.before_run()
    assert before_run is not None
    return before_run


def timed(before_run: BeforeRun, control: RunControl | None = None) -> tuple[float, BaseException | None]:
    started = time.perf_counter()
    try:
        before_run(control or RunControl())
    except InferenceFailed as exc:
        return time.perf_counter() - started, exc
    return time.perf_counter() - started, None


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999999])
def test_zero_percent_leaves_every_call_undisturbed(draw: float) -> None:
    assert injector(draw, delay_ms=5000).before_run() is None
    assert injector(draw, delay_ms=5000, delay_percent=0, error_percent=0).before_run() is None


def test_a_policy_fault_with_no_shares_never_disturbs() -> None:
    fi = FaultInjector(Fault(version="2"))  # the real random draw
    assert all(fi.before_run() is None for _ in range(200))


@pytest.mark.parametrize(("draw", "percent", "disturbed"), [
    (0.0, 0.1, True),
    (0.249, 25, True),
    (0.25, 25, False),  # draw * 100 must be below the percentage
    (0.9, 25, False),
    (0.999999, 100, True),
    (0.5, 50.5, True),
])
def test_error_percent_is_a_threshold_on_the_draw(draw: float, percent: float, disturbed: bool) -> None:
    before_run = injector(draw, error_percent=percent).before_run()
    assert (before_run is not None) == disturbed
    if before_run is not None:
        elapsed, error = timed(before_run)
        assert isinstance(error, InferenceFailed)
        assert error.counts_against_breaker
        assert "injected fault" in str(error)
        assert elapsed < 0.05


@pytest.mark.parametrize(("draw", "percent", "disturbed"), [
    (0.1, 10.5, True), (0.105, 10.5, False), (0.7, 100, True), (0.7, 69.9, False),
])
def test_delay_percent_is_a_threshold_on_the_draw(draw: float, percent: float, disturbed: bool) -> None:
    before_run = injector(draw, delay_ms=20, delay_percent=percent).before_run()
    assert (before_run is not None) == disturbed


def test_a_delay_without_an_error_sleeps_then_lets_the_run_go_ahead() -> None:
    elapsed, error = timed(disturbance(injector(0.0, delay_ms=40, delay_percent=100)))
    assert error is None
    assert 0.035 <= elapsed < 0.2


def test_a_zero_delay_is_no_disturbance() -> None:
    assert injector(0.0, delay_ms=0, delay_percent=100).before_run() is None


def test_a_delay_wakes_up_at_cancel_and_fails_the_run() -> None:
    before_run = disturbance(injector(0.0, delay_ms=60_000, delay_percent=100))
    control = RunControl()
    timer = threading.Timer(0.05, control.cancel)
    timer.start()
    try:
        elapsed, error = timed(before_run, control)
    finally:
        timer.cancel()
    assert isinstance(error, InferenceFailed)
    assert "interrupted by the deadline" in str(error)
    assert 0.04 <= elapsed < 0.5
    assert control.options.terminate is True


def test_a_run_cancelled_before_the_delay_fails_at_once() -> None:
    control = RunControl()
    control.cancel()
    elapsed, error = timed(disturbance(injector(0.0, delay_ms=60_000, delay_percent=100)), control)
    assert isinstance(error, InferenceFailed)
    assert elapsed < 0.05


def test_delay_then_error() -> None:
    elapsed, error = timed(disturbance(injector(0.0, delay_ms=30, delay_percent=100, error_percent=100)))
    assert isinstance(error, InferenceFailed) and "injected fault" in str(error)
    assert 0.025 <= elapsed < 0.2


def test_each_call_draws_afresh() -> None:
    current = [0.9]
    fi = FaultInjector(Fault(version="1", error_percent=50), draw=lambda: current[0])
    outcomes = []
    for value in (0.9, 0.1, 0.9, 0.2):
        current[0] = value
        outcomes.append(fi.before_run() is not None)
    assert outcomes == [False, True, False, True]


def test_status() -> None:
    fi = injector(0.0, delay_ms=250, delay_percent=10, error_percent=5)
    assert fi.status() == {"version": "1", "delay_ms": 250, "delay_percent": 10, "error_percent": 5}


def test_a_fault_version_may_be_written_as_a_number() -> None:
    assert Fault.model_validate({"version": 3}).version == "3"
