"""Progressive rollout: step the canary's share up, judge it against stable, promote or roll back.

One task per rollout. At each step it sets the canary's percentage, then watches the interval:
a breach of any `rollback_if` criterion (once the canary has `min_requests` calls in the step)
rolls back at once; at the end of the interval a step with enough calls and no breach passes
(too few calls: the step is extended). Passing the 100 % step promotes the canary to stable.
Progress is persisted with the aliases; after a restart the rollout resumes at its step, whose
interval starts again.

Under an enforced readiness gate a rollout starts only with a passing report (or forced by an
admin), and the gate is checked again before promotion unless the rollout was forced: the policy
may have changed meanwhile. A closed gate then pauses the rollout (the canary keeps its share)
until a report is uploaded and the rollout resumed, or it is aborted or rolled back.

With several replicas sharing control state, every replica that knows of a running rollout runs its
task, but only the holder of the rollout's lease in the state store judges and steps it (renewed at
every check, `LEASE_TTL_S` long); the others stand by. When the driver dies, its lease runs out and
a standby takes over at the persisted step (whose interval starts again, as after a restart). A
driver that cannot renew its lease (the store is unreachable) stops judging until it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from gateway.control import Conflict, Gate, GateClosed, ReleaseControl
from gateway.policy import Rollout
from gateway.state import RolloutState
from gateway.stats import Interval, TrafficStats, between
from gateway.telemetry import Metrics

log = logging.getLogger("gateway.rollout")

SYSTEM = "rollout-controller"
#: how long a rollout driver's lease lasts without renewal (a dead driver is replaced after this)
LEASE_TTL_S = 5.0


def breaches(plan: Rollout, canary: Interval, stable: Interval) -> list[str]:
    """Every rollback criterion the canary breaks in this interval (empty: healthy or too few calls)."""
    if canary.attempts < plan.min_requests:
        return []
    limits = plan.rollback_if
    found = []
    if limits.error_rate_gt is not None and canary.error_rate > limits.error_rate_gt:
        found.append(f"error rate {canary.error_rate:.3f} > {limits.error_rate_gt}")
    if limits.fallback_rate_gt is not None and canary.fallback_rate > limits.fallback_rate_gt:
        found.append(f"fallback rate {canary.fallback_rate:.3f} > {limits.fallback_rate_gt}")
    if limits.p99_ms_gt is not None and canary.p99_ms is not None and canary.p99_ms > limits.p99_ms_gt:
        found.append(f"p99 {canary.p99_ms:.1f} ms > {limits.p99_ms_gt} ms")
    if (limits.p99_ratio_gt is not None and canary.p99_ms is not None and stable.p99_ms
            and stable.attempts >= plan.min_requests and canary.p99_ms > limits.p99_ratio_gt * stable.p99_ms):
        found.append(f"p99 {canary.p99_ms:.1f} ms > {limits.p99_ratio_gt} x stable's {stable.p99_ms:.1f} ms")
    if (limits.shadow_disagreement_gt is not None and canary.shadow_rows >= plan.min_requests
            and canary.shadow_disagreement > limits.shadow_disagreement_gt):
        found.append(f"shadow disagreement {canary.shadow_disagreement:.3f} > {limits.shadow_disagreement_gt}")
    return found


class RolloutController:
    """Runs rollouts for the models of one gateway."""

    def __init__(self, control: ReleaseControl, stats: TrafficStats, metrics: Metrics,
                 plan_of: Callable[[str], Rollout], clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 drift_state: Callable[[str, str], str] | None = None) -> None:
        self._drift_state = drift_state
        self._control = control
        self._stats = stats
        self._metrics = metrics
        self._plan_of = plan_of
        self._clock = clock
        self._sleep = sleep
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._resume_events: dict[str, asyncio.Event] = {}
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        """This replica's name on rollout leases."""
        self._driving: set[str] = set()
        self._closed = False

    async def start(self, model: str, version: str, actor: str, force: bool = False) -> RolloutState:
        """Begin a rollout of `version` as canary at the plan's first step (GateClosed under an enforced
        readiness gate without a passing report, unless `force`, which the caller checked is an admin's)."""
        async with self._control.lock:
            current = self._control.rollouts.get(model)
            if current is not None and current.active:
                raise Conflict(f"a rollout of version {current.version!r} is already {current.status}")
            served = self._control.current().model(model)
            self._control.require_serving(served, version)
            if version == served.aliases.stable:
                raise Conflict(f"version {version!r} is stable; a canary must be another version")
            gate = await self._control.check_gate_locked(served, version, actor, force, "rollout")
            await self._hold(model)  # the replica that starts a rollout drives it (before others hear of it)
            plan = self._plan_of(model)
            now = self._clock()
            state = RolloutState(version=version, steps=tuple(plan.steps), step=0, status="running",
                                 started_at=now, step_started_at=now, actor=actor, forced=gate.forced,
                                 report_sha256=gate.report_sha256)
            await self._control.set_canary_locked(model, version, plan.steps[0], actor, "rollout_start", state)
        self._launch(model)
        return state

    async def pause(self, model: str, actor: str) -> RolloutState:
        """Hold the canary at its current share until resumed."""
        return await self._set_status(model, "paused", actor, expect="running")

    async def resume(self, model: str, actor: str) -> RolloutState:
        """Continue a paused rollout (its current step's interval starts again)."""
        state = await self._set_status(model, "running", actor, expect="paused")
        self._wake(model)
        return state

    async def abort(self, model: str, actor: str) -> RolloutState:
        """Stop the rollout and take all traffic off the canary."""
        async with self._control.lock:
            state = self._active(model)
            done = replace(state, status="aborted", reason=f"aborted by {actor}")
            await self._control.set_canary_locked(model, None, 0.0, actor, "rollout_abort", done)
        self._metrics.rollout_decisions.labels(model, "abort").inc()
        self._stop(model)
        await self._let_go(model)
        return done

    def status(self, model: str) -> dict[str, Any] | None:
        """The rollout's persisted state, JSON-ready."""
        state = self._control.rollouts.get(model)
        if state is None:
            return None
        return {"version": state.version, "steps": list(state.steps), "step": state.step,
                "percent": state.steps[min(state.step, len(state.steps) - 1)], "status": state.status,
                "reason": state.reason, "started_at": state.started_at, "step_started_at": state.step_started_at,
                "actor": state.actor, "forced": state.forced, "report_sha256": state.report_sha256 or None,
                "driven_here": self.driving(model), "history": list(state.history)}

    def resume_all(self) -> None:
        """After a restart: continue every rollout that was running (paused ones wait for resume)."""
        for model, state in self._control.rollouts.items():
            if state is not None and state.active:
                log.info("resuming the rollout of %s version %s at step %d (%s)", model, state.version,
                         state.step, state.status)
                self._launch(model)

    def adopted(self, model: str) -> None:
        """Another replica changed the model's state: follow its rollout (stand by, or take over)."""
        if self._closed:
            return
        state = self._control.rollouts.get(model)
        if state is None or not state.active:
            return
        task = self._tasks.get(model)
        if task is None or task.done():
            self._launch(model)
        else:
            self._wake(model)

    def driving(self, model: str) -> bool:
        """Whether this replica holds the model's rollout lease."""
        return model in self._driving

    async def close(self) -> None:
        """Stop the tasks (state stays persisted; a restart resumes) and hand leases over."""
        self._closed = True
        tasks = list(self._tasks.values())
        for model in list(self._tasks):
            self._stop(model)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for model in list(self._driving):
            await self._store_call(self._control.store.release, f"rollout:{model}", self.owner)
        self._driving.clear()

    async def _hold(self, model: str) -> bool:
        """Take or renew the rollout's lease (always held with a replica's own file store)."""
        held = bool(await self._store_call(self._control.store.lease, f"rollout:{model}", self.owner, LEASE_TTL_S))
        if held and model not in self._driving:
            log.info("driving the rollout of %s (lease %s)", model, self.owner)
        (self._driving.add if held else self._driving.discard)(model)
        return held

    async def _store_call(self, call: Callable[..., Any], *args: Any) -> Any:
        # a shared store is a network call that may wait up to its timeout: never on the loop
        return await asyncio.to_thread(call, *args) if self._control.store.shared else call(*args)

    # --- the loop --------------------------------------------------------------------------------

    def _launch(self, model: str) -> None:
        self._resume_events[model] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._run(model), name=f"rollout-{model}")
        self._tasks[model] = task

    def _stop(self, model: str) -> None:
        task = self._tasks.pop(model, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _wake(self, model: str) -> None:
        event = self._resume_events.get(model)
        if event is not None:
            event.set()

    async def _run(self, model: str) -> None:
        await self._drive(model)
        await self._let_go(model)  # the rollout ended here: let the lease go at once

    async def _let_go(self, model: str) -> None:
        if model in self._driving:
            self._driving.discard(model)
            await self._store_call(self._control.store.release, f"rollout:{model}", self.owner)

    async def _drive(self, model: str) -> None:
        try:
            while True:
                state = self._control.rollouts.get(model)
                if state is None or not state.active:
                    return
                if state.status == "paused":
                    event = self._resume_events.setdefault(model, asyncio.Event())
                    event.clear()
                    await event.wait()
                    continue
                if not await self._hold(model):  # another replica drives it: stand by
                    await self._sleep(LEASE_TTL_S / 5)
                    continue
                try:
                    if not await self._step(model, state):
                        return
                except Conflict as exc:  # the shared state moved under this driver: follow it, do not roll back
                    log.warning("rollout of %s: %s", model, exc)
                    await self._control.apply_shared(model)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave a canary half-rolled with nobody watching
            log.exception("rollout of %s failed; rolling back", model)
            async with self._control.lock:
                with contextlib.suppress(Exception):
                    await self._control.rollback_locked(model, SYSTEM, "rollout controller error")

    async def _step(self, model: str, state: RolloutState) -> bool:
        """Watch one step; True to go on with the next one."""
        plan = self._plan_of(model)
        stable = self._control.current().model(model).aliases.stable or ""
        base_canary = self._stats.snapshot(model, state.version)
        base_stable = self._stats.snapshot(model, stable)
        started = self._clock()
        check_every = min(max(plan.interval_s / 10, 0.05), 1.0)
        while True:
            await self._sleep(check_every)
            current = self._control.rollouts.get(model)
            if current is None or current.status != "running" or current.step != state.step:
                return current is not None and current.active
            if not await self._hold(model):
                return True  # the lease is gone (the store is away, or another replica took over)
            canary = between(base_canary, self._stats.snapshot(model, state.version))
            baseline = between(base_stable, self._stats.snapshot(model, stable))
            found = breaches(plan, canary, baseline)
            if (plan.rollback_if.drift_alert and self._drift_state is not None
                    and self._drift_state(model, state.version) == "alert"):
                found.append("the canary's inputs or score drifted (drift state alert)")
            if found:
                await self._roll_back(model, "; ".join(found), canary, baseline)
                return False
            if self._clock() - started < plan.interval_s:
                continue
            if canary.attempts < plan.min_requests:
                self._metrics.rollout_decisions.labels(model, "extend").inc()
                continue  # too few calls to judge: the step goes on
            return await self._advance(model, current, canary, baseline)

    async def _advance(self, model: str, state: RolloutState, canary: Interval, stable: Interval) -> bool:
        decision = {"time": self._clock(), "step": state.step, "percent": state.steps[state.step],
                    "decision": "pass", "canary": canary.as_dict(), "stable": stable.as_dict()}
        history = (*state.history, decision)
        async with self._control.lock:
            if not await self._hold(model):  # the lease moved while this step was judged: the new driver decides
                return True
            if state.step + 1 >= len(state.steps):
                return await self._promote(model, state, history)
            nxt = replace(state, step=state.step + 1, step_started_at=self._clock(), history=history)
            await self._control.set_canary_locked(model, state.version, state.steps[state.step + 1], SYSTEM,
                                                  "rollout_step", nxt)
        self._metrics.rollout_decisions.labels(model, "advance").inc()
        return True

    async def _promote(self, model: str, state: RolloutState, history: tuple[dict[str, Any], ...]) -> bool:
        """Promote the canary, unless the readiness gate no longer opens (then pause); True to keep watching."""
        gate = Gate()
        if not state.forced:
            try:
                gate = await self._control.check_gate_locked(self._control.current().model(model), state.version,
                                                             SYSTEM, False, "promote")
            except GateClosed as exc:
                reason = f"promotion held: {exc.message}"
                held = {"time": self._clock(), "step": state.step, "percent": state.steps[state.step],
                        "decision": "gate_closed", "reason": exc.message}
                paused = replace(state, status="paused", reason=reason, history=(*history, held))
                await self._control.save_rollout_locked(model, paused, "rollout_paused", SYSTEM, reason=reason)
                self._metrics.rollout_decisions.labels(model, "pause").inc()
                log.warning("rollout of %s version %s paused before promotion: %s", model, state.version, exc.message)
                return True
        done = replace(state, status="completed", history=history, reason="all steps passed",
                       report_sha256=gate.report_sha256 or state.report_sha256)
        await self._control.promote_locked(model, SYSTEM, done, gate)
        self._metrics.rollout_decisions.labels(model, "promote").inc()
        return False

    async def _roll_back(self, model: str, reason: str, canary: Interval, stable: Interval) -> None:
        async with self._control.lock:
            state = self._control.rollouts.get(model)
            if state is None or not state.active or not await self._hold(model):
                return
            decision = {"time": self._clock(), "step": state.step, "percent": state.steps[state.step],
                        "decision": "rollback", "reason": reason, "canary": canary.as_dict(),
                        "stable": stable.as_dict()}
            done = replace(state, status="rolled_back", reason=reason, history=(*state.history, decision))
            self._control.rollouts[model] = done
            await self._control.set_canary_locked(model, None, 0.0, SYSTEM, "rollout_rollback", done)
        self._metrics.rollout_decisions.labels(model, "rollback").inc()
        log.warning("rollout of %s version %s rolled back: %s", model, state.version, reason)

    async def _set_status(self, model: str, status: str, actor: str, expect: str) -> RolloutState:
        async with self._control.lock:
            state = self._active(model)
            if state.status != expect:
                raise Conflict(f"the rollout is {state.status}, not {expect}")
            changed = replace(state, status=status, step_started_at=self._clock(),
                              reason=state.reason if status == "paused" else "")
            await self._control.save_rollout_locked(model, changed, f"rollout_{status}", actor)
        self._metrics.rollout_decisions.labels(model, "pause" if status == "paused" else "resume").inc()
        return changed

    def _active(self, model: str) -> RolloutState:
        self._control.current().model(model)
        state = self._control.rollouts.get(model)
        if state is None or not state.active:
            raise Conflict(f"model {model!r} has no rollout in progress")
        return state
