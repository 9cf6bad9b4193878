"""Fault injection for rehearsals: delay or fail a share of one version's model calls.

Off unless the process allows it (`GATEWAY_ALLOW_FAULT_INJECTION`); a policy's `faults` on a
server that does not allow them are refused and reported, never applied silently.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import InferenceFailed
from gateway.policy import Fault
from gateway.runtime import BeforeRun, RunControl


@dataclass(frozen=True)
class FaultInjector:
    """Draws, per call, whether this call is delayed and whether it fails."""

    fault: Fault
    draw: Callable[[], float] = random.random

    def before_run(self) -> BeforeRun | None:
        """The disturbance for one call (run in the worker thread), or None for an undisturbed call."""
        delay = self.fault.delay_ms / 1000 if self.draw() * 100 < self.fault.delay_percent else 0.0
        fail = self.draw() * 100 < self.fault.error_percent
        if not delay and not fail:
            return None

        def disturb(control: RunControl) -> None:
            if delay and control.wait(delay):
                raise InferenceFailed("injected delay interrupted by the deadline")
            if fail:
                raise InferenceFailed("injected fault (policy `faults`)")

        return disturb

    def status(self) -> dict[str, float | str]:
        """What is active, for the status endpoint."""
        return {"version": self.fault.version, "delay_ms": self.fault.delay_ms,
                "delay_percent": self.fault.delay_percent, "error_percent": self.fault.error_percent}
