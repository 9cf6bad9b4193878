"""Inference endpoints (OIP v2 and KServe v1), answered straight from ASGI ahead of FastAPI.

These four routes carry nearly all the traffic, so they skip the framework's per-request work
(its telemetry hook, middleware stack, request objects, routing tables, dependency solving): the
path is matched with one regular expression, the body is read straight from `receive`, and the
answer leaves as two ASGI messages. Every other route (health, metadata, admin, ...) goes to
FastAPI. Behaviour is the framework's: same statuses, bodies and headers, 405 for other methods,
and an unexpected exception is logged with its stack and answered 500 JSON.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry.trace import SpanKind

from gateway.api.body import ClientGone, header_length, receive_body
from gateway.api.errors import error_payload, status_of
from gateway.audit import AuditFull
from gateway.codec import Answer, DecodedRequest, decode_v1, decode_v2, encode_v1, encode_v2, positive_ms
from gateway.errors import GatewayError, SchemaViolation, Unavailable
from gateway.pipeline import InferenceCall
from gateway.registry import ServedModel
from gateway.telemetry import UNKNOWN_MODEL
from gateway.tracing import Span, incoming_context, trace_id, unrecorded_span

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = dict[str, str]

#: the same paths FastAPI routes would match (`{model}` and `{version}` are one path segment each)
V2_PATH = re.compile(r"/v2/models/([^/]+?)(?:/versions/([^/]+))?/infer")
V1_PATH = re.compile(r"/v1/models/([^/]+?)(?:/versions/([^/]+?))?:predict")

_HEADER_SAFE = re.compile(r"[\x21-\x7e]{1,128}")
_JSON = b"application/json"
_BINARY = b"application/octet-stream"

Decode = Callable[[bytes, Headers], DecodedRequest]
Encode = Callable[[Answer, DecodedRequest], tuple[bytes, dict[str, str], bytes]]


def _decode_v2(body: bytes, headers: Headers) -> DecodedRequest:
    return decode_v2(body, header_length(headers))


def _encode_v2(answer: Answer, decoded: DecodedRequest) -> tuple[bytes, dict[str, str], bytes]:
    body, headers = encode_v2(answer, decoded)
    return body, headers, _BINARY if headers else _JSON


def _decode_v1(body: bytes, headers: Headers) -> DecodedRequest:
    return decode_v1(body)


def _encode_v1(answer: Answer, decoded: DecodedRequest) -> tuple[bytes, dict[str, str], bytes]:
    return encode_v1(answer), {}, _JSON


class Reply:
    """A finished answer: status, body, media type and extra headers."""

    __slots__ = ("body", "headers", "media", "status")

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None, media: bytes = _JSON) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else {}
        self.media = media

    async def send(self, send: Send) -> None:
        """Send as one response (two ASGI messages)."""
        raw = [(b"content-type", self.media), (b"content-length", str(len(self.body)).encode())]
        raw += [(name.lower().encode(), value.encode("latin-1")) for name, value in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})


class InferenceEndpoints:
    """Answers the inference paths straight from ASGI; the app hands every request here first."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer the request if it is for an inference path (True), else leave it alone (False)."""
        if scope["type"] != "http":
            return False
        path = scope["path"]
        if path.endswith("/infer"):
            match, protocol, decode, encode = V2_PATH.fullmatch(path), "v2", _decode_v2, _encode_v2
        elif path.endswith(":predict"):
            match, protocol, decode, encode = V1_PATH.fullmatch(path), "v1", _decode_v1, _encode_v1
        else:
            return False
        if match is None:
            return False
        if scope["method"] != "POST":
            message = f"method {scope['method']} is not allowed on {path}; use POST"
            await Reply(405, orjson.dumps({"error": message}), {"Allow": "POST"}).send(send)
            return True
        # first occurrence wins, as with Starlette's Headers.get; names arrive lower-cased
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(scope["headers"])}
        try:
            reply = await self._serve(receive, headers, protocol, match.group(1), match.group(2), decode, encode)
        except ClientGone:
            return True  # nobody to answer
        except Exception as exc:  # a bug: logged with its stack, answered like the app's own handler
            log.exception("unexpected error on %s %s", scope["method"], path)
            message = f"internal error ({type(exc).__name__}); see the gateway log"
            reply = Reply(500, orjson.dumps({"error": message}))
        await reply.send(send)
        return True

    async def _serve(self, receive: Receive, headers: Headers, protocol: str, model: str, version: str | None,
                     decode: Decode, encode: Encode) -> Reply:
        """One span per request (joining the caller's trace), its id in `X-Trace-Id`."""
        gateway = self.gateway
        if not gateway.trace_roots and "traceparent" not in headers:
            span = unrecorded_span()
            reply = await self._serve_in_span(receive, headers, protocol, model, version, decode, encode, span)
            reply.headers["X-Trace-Id"] = trace_id(span)
            return reply
        with gateway.tracer.start_as_current_span(f"{protocol} infer", context=incoming_context(headers),
                                                  kind=SpanKind.SERVER) as span:
            reply = await self._serve_in_span(receive, headers, protocol, model, version, decode, encode, span)
            if span.is_recording():
                span.set_attribute("gateway.model", model)
                span.set_attribute("gateway.protocol", protocol)
                span.set_attribute("http.response.status_code", reply.status)
                for header, attribute in (("X-Model-Version", "gateway.version"), ("X-Route", "gateway.route"),
                                          ("X-Fallback", "gateway.fallback_reason")):
                    if header in reply.headers:
                        span.set_attribute(attribute, reply.headers[header])
            reply.headers["X-Trace-Id"] = trace_id(span)
            return reply

    async def _serve_in_span(self, receive: Receive, headers: Headers, protocol: str, model: str,
                             version: str | None, decode: Decode, encode: Encode, span: Span) -> Reply:
        """Read, decode, run the pipeline, encode; record the outcome of every request once."""
        gateway = self.gateway
        metrics = gateway.metrics
        started = time.perf_counter()
        served_model = gateway.snapshot.models.get(model)
        label = model if served_model is not None else UNKNOWN_MODEL
        version_label = _version_label(served_model, version)
        request_id = headers.get("x-request-id")
        arrived = asyncio.get_running_loop().time()
        try:
            body = await receive_body(receive, headers, gateway.settings.max_body_bytes)
            decoded = decode(body, headers)
            header_timeout = headers.get("x-timeout-ms")
            timeout_ms = positive_ms(header_timeout, "X-Timeout-Ms") if header_timeout is not None else None
            if decoded.timeout_ms is not None:
                timeout_ms = decoded.timeout_ms if timeout_ms is None else min(timeout_ms, decoded.timeout_ms)
            call = InferenceCall(model, version, decoded.columns, decoded.outputs,
                                 decoded.id if decoded.id is not None else request_id, arrived, timeout_ms,
                                 headers)
            answer, batch = await gateway.pipeline.infer(call)
        except GatewayError as exc:
            _, outcome = status_of(exc)
            metrics.requests.labels(label, version_label, "pinned" if version else "", protocol, outcome).inc()
            if isinstance(exc, SchemaViolation) and label != UNKNOWN_MODEL:
                for reason, count in exc.violations.by_reason.items():
                    metrics.validation_failures.labels(label, reason).inc(count)
            status, payload = error_payload(exc)
            return Reply(status, payload, {"X-Request-Id": request_id} if request_id else None)
        except ClientGone:
            raise
        except Exception as exc:
            metrics.requests.labels(label, version_label, "pinned" if version else "", protocol, "error").inc()
            span.record_exception(exc)
            raise  # `handle` logs it with the stack and answers 500 JSON

        refusal = await _audit(gateway, model, answer, decoded, span, started)
        if refusal is not None:
            return refusal
        payload, extra, media = encode(answer, decoded)
        parameters = answer.parameters
        route = str(parameters["route"])  # stable, canary, pinned or fallback
        extra["X-Model-Version"] = answer.version
        if _HEADER_SAFE.fullmatch(answer.request_id):  # the body always echoes it; headers only if it is safe
            extra["X-Request-Id"] = answer.request_id
        extra["X-Route"] = route
        attempted = str(parameters.get("attempted_version", answer.version))  # a fallback names what it stood in for
        fallback_reason = parameters.get("fallback_reason")
        if fallback_reason is not None:
            extra["X-Fallback"] = str(fallback_reason)
            metrics.fallbacks.labels(label, attempted, str(fallback_reason)).inc()
        outcome = "fallback" if parameters.get("fallback") else "ok"
        metrics.record_answer(label, attempted, route, protocol, outcome, time.perf_counter() - started, answer.rows)
        if batch.ignored_fields:
            metrics.ignored_fields.labels(label).inc(len(batch.ignored_fields))
        return Reply(200, payload, extra, media)


def _version_label(model: ServedModel | None, version: str | None) -> str:
    """A URL version as a metric label only when it exists, so clients cannot grow cardinality."""
    if version is None:
        return ""
    return version if model is not None and version in model.versions else UNKNOWN_MODEL


async def _audit(gateway: Gateway, model: str, answer: Answer, decoded: DecodedRequest, span: Span,
                 started: float) -> Reply | None:
    """Record the answer in the audit log before it leaves; a 503 instead when the log is full and the
    policy says `reject` (nothing is answered unrecorded)."""
    served = gateway.snapshot.models.get(model)
    spec = served.policy.policy.audit if served is not None and served.policy is not None else None
    if spec is not None and not spec.enabled:
        return None
    attempted = str(answer.parameters.get("attempted_version", answer.version))
    entry = served.versions.get(attempted) if served is not None else None
    inputs = {name: c.values for name, c in decoded.columns.items()}  # the writer makes them plain JSON
    record = {
        "kind": "request", "time": time.time(), "request_id": answer.request_id, "trace_id": trace_id(span),
        "model": model, "version": answer.version, "attempted_version": attempted,
        "route": answer.parameters.get("route"),
        "inputs": gateway.redactor(model).apply(inputs),
        "outputs": answer.outputs,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        "fallback_reason": answer.parameters.get("fallback_reason"),
        "policy_sha256": served.policy.sha256 if served is not None and served.policy is not None else None,
        "model_sha256": entry.sha256 if entry is not None else None,
    }
    try:
        if not await gateway.audit.submit(record, spec.on_full if spec is not None else "block"):
            gateway.metrics.audit_records.labels("dropped").inc()
    except AuditFull as exc:
        gateway.metrics.audit_records.labels("rejected").inc()
        status, payload = error_payload(Unavailable(f"{exc}; the answer was withheld (audit.on_full: reject)"))
        return Reply(status, payload)
    return None


__all__ = ["InferenceEndpoints", "Reply"]
