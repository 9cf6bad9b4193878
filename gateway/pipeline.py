"""The request path as one recipe: snapshot, resolve, validate, guard, run, fallback, answer.

Knows nothing of HTTP. Every way a model can fail to answer in time (no routable version, open
breaker, overload, deadline, runtime error) ends in the policy's fallback when it has one, or in
the matching error when it has none; client errors never reach the model or the fallback.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import Tracer

from gateway.codec import Answer
from gateway.errors import (
    CircuitOpen,
    InferenceFailed,
    InferenceTimeout,
    Overloaded,
    QueuedTooLong,
    SchemaViolation,
    Unavailable,
    Violation,
)
from gateway.monitoring import Monitoring
from gateway.registry import ServedModel, ServedVersion, Snapshot
from gateway.routing import choose_version, shadow_version, sticky_value
from gateway.runtime import INLINE
from gateway.shadow import ShadowJob, ShadowMirror
from gateway.stats import TrafficStats
from gateway.tracing import stage_tracer
from gateway.validation import Column, ValidatedBatch

#: why the fallback answered, by the failure that sent the request there
FALLBACK_REASONS: dict[type[Exception], str] = {
    CircuitOpen: "circuit_open",
    Overloaded: "overloaded",
    InferenceTimeout: "timeout",
    InferenceFailed: "runtime_error",
    Unavailable: "unavailable",
}
_RECOVERABLE = (CircuitOpen, Overloaded, InferenceTimeout, InferenceFailed)


@dataclass
class InferenceCall:
    """One decoded request as the pipeline sees it."""

    model: str
    version: str | None
    columns: dict[str, Column]
    outputs: list[str] | None
    request_id: str | None
    arrived: float
    """Loop time the request arrived; the deadline counts from here."""
    timeout_ms: float | None = None
    """The client's own deadline, if it asked for one (it can shorten the policy's, never extend it)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Request metadata (lower-case names), for a sticky routing key."""


class InferencePipeline:
    """Turns decoded requests into answers from a model version or from the fallback."""

    def __init__(self, snapshot: Callable[[], Snapshot], executor: ThreadPoolExecutor,
                 max_queued: int = 256, stats: TrafficStats | None = None, shadow: ShadowMirror | None = None,
                 draw: Callable[[], float] = random.random, monitor: Monitoring | None = None,
                 tracer: Tracer | None = None) -> None:
        self._snapshot = snapshot
        self._executor = executor
        self._max_queued = max_queued
        self.stats = stats or TrafficStats()
        self._shadow = shadow
        self._draw = draw
        self._monitor = monitor
        self._tracer = tracer or trace.NoOpTracer()
        self.inline = INLINE
        self.in_flight = 0
        self.fallbacks: Counter[tuple[str, str]] = Counter()
        self.answered: Counter[str] = Counter()

    async def infer(self, call: InferenceCall) -> tuple[Answer, ValidatedBatch]:
        """Answer one request; raises a GatewayError subclass when neither model nor fallback can."""
        model = self._snapshot().model(call.model)
        if self._monitor is not None:
            self._monitor.count(model.name)
        budget = model.timeout_s if call.timeout_ms is None else min(model.timeout_s, call.timeout_ms / 1000)
        deadline = call.arrived + budget
        # A deadline the client shortened is the client's choice: running out of it says nothing
        # about the version, so it neither trips the breaker nor counts in rollout figures.
        client_deadline = budget < model.timeout_s
        request_id = call.request_id if call.request_id is not None else new_request_id()
        tracer = stage_tracer(self._tracer)
        try:
            with tracer.start_as_current_span("route") as span:
                served, route = self._route(model, call)
                span.set_attribute("gateway.version", served.entry.version)
                span.set_attribute("gateway.route", route)
        except Unavailable as exc:
            if model.fallback is None:
                raise
            with tracer.start_as_current_span("validate"):
                batch = model.fallback.validator.validate(call.columns)
            with tracer.start_as_current_span("fallback") as span:
                span.set_attribute("gateway.fallback_reason", "unavailable")
                return self._fallback(model, batch, call.outputs, request_id, exc, call.version or ""), batch

        with tracer.start_as_current_span("validate") as span:
            batch = served.validator.validate(call.columns)
            span.set_attribute("gateway.rows", batch.rows)
        wanted = _requested_outputs(served, call.outputs)
        run_outputs = _with_score(served, model, wanted)
        version = served.entry.version
        try:
            with tracer.start_as_current_span("infer") as span:
                span.set_attribute("gateway.version", version)
                results = await self._guarded_run(served, batch, run_outputs, deadline, client_deadline)
        except _RECOVERABLE as exc:
            if not isinstance(exc, Overloaded):  # overload is the process's, not the version's, fault
                version_failed = not (isinstance(exc, QueuedTooLong)
                                      or (client_deadline and isinstance(exc, InferenceTimeout)))
                self.stats.record(model.name, version, self._elapsed(call), version_failed,
                                  model.fallback is not None)
            if model.fallback is None:
                raise
            with tracer.start_as_current_span("fallback") as span:
                answer = self._fallback(model, batch, wanted, request_id, exc, version)
                span.set_attribute("gateway.fallback_reason", str(answer.parameters["fallback_reason"]))
            return answer, batch
        if self._monitor is not None:
            self._monitor.observe(model, served, batch, results, request_id)
        answer = self._model_answer(model, served, batch, results, wanted, request_id, route)
        self.stats.record(model.name, version, self._elapsed(call), False, "fallback_rows" in answer.parameters)
        if route != "pinned" and self._shadow is not None:
            self._mirror(model, version, call.columns, results, request_id)
        return answer, batch

    def _route(self, model: ServedModel, call: InferenceCall) -> tuple[ServedVersion, str]:
        if call.version is not None:
            return model.resolve(call.version), "pinned"
        spec = model.policy.policy.routing.sticky_key if model.policy else None
        version, route = choose_version(model, sticky_value(spec, call.headers, call.columns), self._draw)
        if version is None:
            model.resolve(None)  # raises Unavailable with the reason
        assert version is not None
        return model.served[version], route

    def _mirror(self, model: ServedModel, primary: str, columns: dict[str, Column],
                results: dict[str, np.ndarray], request_id: str) -> None:
        target = shadow_version(model, self._draw)
        if target is None or target == primary or self._shadow is None:
            return
        capacity = model.policy.policy.routing.shadow_queue if model.policy else 100
        self._shadow.offer(ShadowJob(model.name, target, columns, results, request_id, primary), capacity)

    @staticmethod
    def _elapsed(call: InferenceCall) -> float:
        return asyncio.get_running_loop().time() - call.arrived

    async def _guarded_run(self, served: ServedVersion, batch: ValidatedBatch, outputs: list[str] | None,
                           deadline: float, client_deadline: bool = False) -> dict[str, np.ndarray]:
        if self.in_flight >= self._max_queued:
            raise Overloaded(f"{self.in_flight} model calls are already in flight or queued "
                             f"(GATEWAY_MAX_QUEUED_INFERENCES={self._max_queued})")
        ticket = served.breaker.admit()
        self.in_flight += 1
        try:
            model = served.entry.model
            assert model is not None
            if served.batcher is not None:  # draws its rehearsal faults per batch
                results = await served.batcher.run(batch.feeds, batch.rows, outputs, self._executor, deadline)
            else:
                before_run = served.faults.before_run() if served.faults else None
                results = await model.predict(batch.feeds, outputs, self._executor, deadline, before_run)
        except InferenceTimeout as exc:
            if client_deadline or isinstance(exc, QueuedTooLong):
                served.breaker.release(ticket)
            else:
                served.breaker.record(ticket, exc)
            raise
        except InferenceFailed as exc:
            served.breaker.record(ticket, exc)
            raise
        except BaseException:  # e.g. the client went away: the call taught us nothing
            served.breaker.release(ticket)
            raise
        else:
            served.breaker.record(ticket, None)
        finally:
            self.in_flight -= 1
        return results

    def _model_answer(self, model: ServedModel, served: ServedVersion, batch: ValidatedBatch,
                      results: dict[str, np.ndarray], wanted: list[str] | None, request_id: str,
                      route: str) -> Answer:
        assert served.entry.model is not None
        datatypes = served.entry.model.output_datatypes
        parameters: dict[str, str | int | float | bool] = {"route": route}
        low = model.fallback.low_confidence if model.fallback else None
        score = served.entry.card.score if served.entry.card else None
        if low is not None and score is not None and model.fallback is not None:
            values = results[score.output].reshape(batch.rows, -1)[:, score.index or 0].tolist()
            lo, hi = low.band
            shaky = [row for row, value in enumerate(values) if lo <= value <= hi]  # NaN is never in the band
            if shaky:
                parameters["low_confidence_rows"] = ",".join(map(str, shaky))
                if low.action == "review":
                    parameters["review"] = True
                else:
                    fb = model.fallback.rules.answer(batch.feeds, batch.rows)
                    for name, array in results.items():
                        if name in fb.outputs:
                            array[shaky] = fb.outputs[name][shaky]
                    parameters["fallback_rows"] = ",".join(map(str, shaky))
                    parameters["fallback_reason"] = "low_confidence"
                    self.fallbacks[(model.name, "low_confidence")] += 1
        if wanted is not None:
            results = {name: results[name] for name in wanted}
        self.answered[model.name] += 1
        return Answer(model.name, served.entry.version, request_id, results, datatypes, batch.rows, parameters)

    def _fallback(self, model: ServedModel, batch: ValidatedBatch, wanted: list[str] | None,
                  request_id: str, cause: Exception, attempted: str) -> Answer:
        assert model.fallback is not None
        rules = model.fallback.rules
        known = [t.name for t in rules.outputs]
        unknown = [name for name in (wanted or []) if name not in known]
        if unknown:
            raise SchemaViolation([Violation(f"outputs ({name})", "unknown_output", f"one of {known}", repr(name))
                                   for name in unknown])
        answer = rules.answer(batch.feeds, batch.rows, list(dict.fromkeys(wanted)) if wanted else None)
        reason = next(r for cls, r in FALLBACK_REASONS.items() if isinstance(cause, cls))
        self.fallbacks[(model.name, reason)] += 1
        self.answered[model.name] += 1
        parameters: dict[str, str | int | float | bool] = {
            "route": "fallback", "fallback": True, "fallback_reason": reason,
            "fallback_rules": ",".join(answer.rules), "attempted_version": attempted,
            "fallback_detail": cause.args[0] if cause.args else reason,
        }
        return Answer(model.name, "fallback", request_id, answer.outputs,
                      {t.name: t.datatype for t in rules.outputs}, batch.rows, parameters)


def new_request_id() -> str:
    """32 random hex digits. Not `uuid4()`: that reads the kernel's random source, a system call
    whose cost showed in profiles; request ids need to be unique, not unguessable."""
    return f"{random.getrandbits(128):032x}"


def _requested_outputs(served: ServedVersion, outputs: list[str] | None) -> list[str] | None:
    if not outputs:
        return None
    assert served.entry.model is not None
    known = served.entry.model.output_names
    unknown = [name for name in outputs if name not in known]
    if unknown:
        raise SchemaViolation([Violation(f"outputs ({name})", "unknown_output", f"one of {known}", repr(name))
                               for name in unknown])
    return list(dict.fromkeys(outputs))


def _with_score(served: ServedVersion, model: ServedModel, wanted: list[str] | None) -> list[str] | None:
    """The outputs to compute: the wanted ones, plus the card's score (monitoring and low-confidence checks)."""
    score = served.entry.card.score if served.entry.card else None
    if wanted is None or score is None:
        return wanted
    return wanted if score.output in wanted else [*wanted, score.output]
