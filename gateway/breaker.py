"""Per-version circuit breakers: pybreaker's state machine, driven from async code.

pybreaker's `call()` holds its lock for the whole guarded call, which in async code would mean
holding a thread lock across an await (and serialising every inference). So a call is split in
two synchronous steps around the await, and the lock is only ever held inside pybreaker:

1. `admit()` decides from the state whether the call may go ahead: closed lets everything
   through; open rejects until `reset_timeout_s` has passed on the injected clock, then moves
   the breaker to half-open (pybreaker's `half_open()`); half-open lets exactly one trial
   through at a time and rejects the rest.
2. `record(ticket, error)` replays the outcome through pybreaker's own `call()`, so its state
   classes count the failure, trip, close after a successful trial, notify listeners and write
   to its storage exactly as for a synchronous call, in microseconds on the event loop.

Outcomes of calls admitted before the breaker tripped are dropped (they say nothing new).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pybreaker

from gateway.errors import CircuitOpen, GatewayError

log = logging.getLogger("gateway.breaker")

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
StateListener = Callable[[str, str, str], None]  # (breaker name, old state, new state)


@dataclass(frozen=True)
class Ticket:
    """Permission for one call; `trial` marks the half-open probe; `epoch` counts trips so far."""

    trial: bool
    epoch: int = field(default=0, compare=False)


def _not_counted(error: BaseException) -> bool:
    return isinstance(error, GatewayError) and not error.counts_against_breaker


def _replay(error: BaseException | None) -> None:
    if error is not None:
        raise error


class _Notify(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: AsyncBreaker) -> None:
        self.owner = owner

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        self.owner._changed(old_state.name if old_state else "", new_state.name)


class AsyncBreaker:
    """One version's breaker. All methods are synchronous and quick; call them from the event loop."""

    def __init__(self, name: str, fail_max: int, reset_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic, on_change: StateListener | None = None) -> None:
        self.name = name
        self.fail_max = fail_max
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._on_change = on_change
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self._epoch = 0  # bumped on every trip: outcomes of calls admitted before it are stale
        self._remote_trip = False
        self.on_trip: Callable[[str], None] | None = None
        """Told the breaker's name when it trips here (not when another replica's trip opened it)."""
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout_s, exclude=[_not_counted],
            listeners=[_Notify(self)], name=name)

    @property
    def state(self) -> str:
        """`closed`, `open` or `half-open`."""
        return str(self.breaker.current_state)

    def admit(self) -> Ticket:
        """A ticket for one call, or CircuitOpen."""
        state = self.state
        if state == CLOSED:
            return Ticket(trial=False, epoch=self._epoch)
        if state == OPEN:
            if self._opened_at is None:  # opened elsewhere (shared storage): count from now
                self._opened_at = self._clock()
            waited = self._clock() - self._opened_at
            if waited < self.reset_timeout_s:
                raise CircuitOpen(f"circuit breaker of {self.name} is open "
                                  f"(retry in {self.reset_timeout_s - waited:.1f} s)")
            self.breaker.half_open()
        if self._trial_in_flight:
            raise CircuitOpen(f"circuit breaker of {self.name} is half-open and a trial request is in flight")
        self._trial_in_flight = True
        return Ticket(trial=True, epoch=self._epoch)

    def record(self, ticket: Ticket, error: BaseException | None) -> None:
        """Feed the outcome of an admitted call to the state machine."""
        if ticket.trial:
            self._trial_in_flight = False
        elif ticket.epoch != self._epoch or self.state != CLOSED:
            return  # admitted before a trip: stale news; trials decide from there on
        elif error is None and self.breaker.fail_counter == 0:
            return  # a success with no failures counted changes nothing: skip pybreaker's lock
        try:
            self.breaker.call(_replay, error)
        except pybreaker.CircuitBreakerError:
            pass  # the replayed failure tripped the breaker; listeners already saw it
        except BaseException as exc:
            if exc is not error:  # anything but the replayed failure (counted by pybreaker) is a bug
                raise

    def release(self, ticket: Ticket) -> None:
        """Give back a ticket whose call never ran (nothing to learn from it)."""
        if ticket.trial:
            self._trial_in_flight = False

    def trip_from_elsewhere(self) -> bool:
        """Open because another replica's breaker of this version tripped (True if it was not open);
        this replica then tries its own trial after the reset timeout, like after a trip of its own."""
        if self.state == OPEN:
            return False
        self._remote_trip = True
        try:
            self.breaker.open()
        finally:
            self._remote_trip = False
        return True

    def _changed(self, old: str, new: str) -> None:
        if new == OPEN:
            self._opened_at = self._clock()
            self._epoch += 1
            if not self._remote_trip and self.on_trip is not None:
                self.on_trip(self.name)
        level = logging.WARNING if new != CLOSED else logging.INFO
        log.log(level, "circuit breaker %s: %s -> %s", self.name, old or "(new)", new)
        if self._on_change is not None:
            self._on_change(self.name, old, new)

    def status(self) -> dict[str, Any]:
        """JSON-ready state for the status endpoint."""
        return {"state": self.state, "failures": self.breaker.fail_counter, "fail_max": self.fail_max,
                "reset_timeout_s": self.reset_timeout_s}
