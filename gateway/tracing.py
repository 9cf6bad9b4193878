"""OpenTelemetry tracing: one span per request, a child span per stage, the trace id in a header.

The tracer provider belongs to the app (never the global one). Exporters, by setting:
`none` (spans are still made, so every answer carries a trace id, but nothing is exported),
`console` (stdout, for development), `otlp` (OTLP over HTTP; needs the optional package
`opentelemetry-exporter-otlp-proto-http`, endpoint from the standard `OTEL_EXPORTER_OTLP_*`
variables). Incoming W3C `traceparent` headers are honoured, so the gateway's spans join the
caller's trace.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, Span, SpanContext, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway import __version__

_PROPAGATOR = TraceContextTextMapPropagator()


class TracingUnavailable(Exception):
    """The chosen exporter cannot be set up (e.g. its package is not installed)."""


def make_tracer(exporter: str, sample_ratio: float | None = None) -> tuple[Tracer, TracerProvider]:
    """A tracer whose spans go to `exporter` (none, console or otlp).

    Unsampled spans cost almost nothing but still carry a trace id; by default nothing is sampled
    when nothing is exported, and everything is when something is (unless the caller's
    `traceparent` decided otherwise: the sampler follows the parent).
    """
    ratio = sample_ratio if sample_ratio is not None else (0.0 if exporter == "none" else 1.0)
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway", "service.version": __version__}),
                              sampler=ParentBased(TraceIdRatioBased(ratio)))
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise TracingUnavailable("GATEWAY_TRACE_EXPORTER=otlp needs the package "
                                     "opentelemetry-exporter-otlp-proto-http") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider.get_tracer("gateway"), provider


def never_sampled(exporter: str, sample_ratio: float | None) -> bool:
    """Whether a request without a caller's trace context is never recorded under these settings."""
    ratio = sample_ratio if sample_ratio is not None else (0.0 if exporter == "none" else 1.0)
    return ratio <= 0


def unrecorded_span() -> Span:
    """What the SDK makes for a request it will not record (a fresh trace id, nothing exported),
    without its sampler, context and processor calls: the common case costs next to nothing."""
    return NonRecordingSpan(SpanContext(trace_id=random.getrandbits(128) or 1, span_id=random.getrandbits(64) or 1,
                                        is_remote=False))


class _Quiet:
    """A tracer stand-in for stages of a request that is not recorded: no spans at all."""

    _nothing: contextlib.nullcontext[Span] = contextlib.nullcontext(INVALID_SPAN)  # reusable: no state

    def start_as_current_span(self, name: str, *args: Any, **kwargs: Any) -> contextlib.nullcontext[Span]:
        return self._nothing


QUIET = _Quiet()


def stage_tracer(tracer: Tracer) -> Tracer | _Quiet:
    """`tracer` when the current request span is recorded, else the no-op stand-in."""
    return tracer if trace.get_current_span().is_recording() else QUIET


def incoming_context(headers: Mapping[str, str]) -> Context:
    """The caller's trace context from `traceparent` / `tracestate`, if any."""
    carrier = {k: v for k in ("traceparent", "tracestate") if (v := headers.get(k)) is not None}
    return _PROPAGATOR.extract(carrier)


def trace_id(span: Span) -> str:
    """The span's trace id as 32 hex digits (what the `X-Trace-Id` header carries)."""
    return format(span.get_span_context().trace_id, "032x")


__all__ = ["QUIET", "Span", "Tracer", "TracingUnavailable", "incoming_context", "make_tracer", "never_sampled",
           "stage_tracer", "trace", "trace_id", "unrecorded_span"]
