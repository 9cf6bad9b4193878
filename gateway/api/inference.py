"""Inference routes: Open Inference Protocol v2 and KServe v1."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter
from opentelemetry.trace import SpanKind
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.body import header_length, read_body
from gateway.api.errors import error_response, status_of
from gateway.audit import AuditFull
from gateway.codec import Answer, DecodedRequest, decode_v1, decode_v2, encode_v1, encode_v2, positive_ms
from gateway.errors import GatewayError, SchemaViolation, Unavailable
from gateway.pipeline import InferenceCall
from gateway.registry import ServedModel
from gateway.telemetry import UNKNOWN_MODEL
from gateway.tracing import Span, incoming_context, trace_id

if TYPE_CHECKING:
    from gateway.app import Gateway

router = APIRouter()

_HEADER_SAFE = re.compile(r"[\x21-\x7e]{1,128}")

Decode = Callable[[bytes, Request], DecodedRequest]
Encode = Callable[[Answer, DecodedRequest], tuple[bytes, dict[str, str], str]]


def _decode_v2(body: bytes, request: Request) -> DecodedRequest:
    return decode_v2(body, header_length(request))


def _encode_v2(answer: Answer, decoded: DecodedRequest) -> tuple[bytes, dict[str, str], str]:
    body, headers = encode_v2(answer, decoded)
    media = "application/octet-stream" if headers else "application/json"
    return body, headers, media


def _decode_v1(body: bytes, request: Request) -> DecodedRequest:
    return decode_v1(body)


def _encode_v1(answer: Answer, decoded: DecodedRequest) -> tuple[bytes, dict[str, str], str]:
    return encode_v1(answer), {}, "application/json"


def _version_label(model: ServedModel | None, version: str | None) -> str:
    """A URL version as a metric label only when it exists, so clients cannot grow cardinality."""
    if version is None:
        return ""
    return version if model is not None and version in model.versions else UNKNOWN_MODEL


async def _serve(request: Request, protocol: str, model: str, version: str | None,
                 decode: Decode, encode: Encode) -> Response:
    """One span per request (joining the caller's trace), its id in `X-Trace-Id`."""
    gateway: Gateway = request.app.state.gateway
    with gateway.tracer.start_as_current_span(f"{protocol} infer", context=incoming_context(request.headers),
                                              kind=SpanKind.SERVER) as span:
        span.set_attribute("gateway.model", model)
        span.set_attribute("gateway.protocol", protocol)
        response = await _serve_in_span(request, protocol, model, version, decode, encode, span)
        span.set_attribute("http.response.status_code", response.status_code)
        for header, attribute in (("x-model-version", "gateway.version"), ("x-route", "gateway.route"),
                                  ("x-fallback", "gateway.fallback_reason")):
            if header in response.headers:
                span.set_attribute(attribute, response.headers[header])
        response.headers["X-Trace-Id"] = trace_id(span)
        return response


async def _serve_in_span(request: Request, protocol: str, model: str, version: str | None,
                         decode: Decode, encode: Encode, span: Span) -> Response:
    """Read, decode, run the pipeline, encode; record the outcome of every request once."""
    gateway: Gateway = request.app.state.gateway
    metrics = gateway.metrics
    started = time.perf_counter()
    served_model = gateway.snapshot.models.get(model)
    label = model if served_model is not None else UNKNOWN_MODEL
    version_label = _version_label(served_model, version)
    request_id = request.headers.get("x-request-id")
    arrived = asyncio.get_running_loop().time()
    try:
        body = await read_body(request, gateway.settings.max_body_bytes)
        decoded = decode(body, request)
        header_timeout = request.headers.get("x-timeout-ms")
        timeout_ms = positive_ms(header_timeout, "X-Timeout-Ms") if header_timeout is not None else None
        if decoded.timeout_ms is not None:
            timeout_ms = decoded.timeout_ms if timeout_ms is None else min(timeout_ms, decoded.timeout_ms)
        call = InferenceCall(model, version, decoded.columns, decoded.outputs,
                             decoded.id if decoded.id is not None else request_id, arrived, timeout_ms,
                             request.headers)
        answer, batch = await gateway.pipeline.infer(call)
    except GatewayError as exc:
        _, outcome = status_of(exc)
        metrics.requests.labels(label, version_label, "pinned" if version else "", protocol, outcome).inc()
        if isinstance(exc, SchemaViolation) and label != UNKNOWN_MODEL:
            for reason, count in exc.violations.by_reason.items():
                metrics.validation_failures.labels(label, reason).inc(count)
        headers = {"X-Request-Id": request_id} if request_id else None
        return error_response(exc, headers)
    except Exception as exc:
        metrics.requests.labels(label, version_label, "pinned" if version else "", protocol, "error").inc()
        span.record_exception(exc)
        raise  # the app's handler logs it with the stack and answers 500 JSON

    refusal = await _audit(gateway, model, answer, decoded, span, started)
    if refusal is not None:
        return refusal
    payload, headers, media = encode(answer, decoded)
    headers["X-Model-Version"] = answer.version
    if _HEADER_SAFE.fullmatch(answer.request_id):  # the body always echoes it; headers only if it is safe
        headers["X-Request-Id"] = answer.request_id
    headers["X-Route"] = str(answer.parameters["route"])  # stable, canary, pinned or fallback
    route = str(answer.parameters["route"])
    attempted = str(answer.parameters.get("attempted_version", answer.version))  # a fallback names what it stood in for
    fallback_reason = answer.parameters.get("fallback_reason")
    if fallback_reason is not None:
        headers["X-Fallback"] = str(fallback_reason)
        metrics.fallbacks.labels(label, attempted, str(fallback_reason)).inc()
    outcome = "fallback" if answer.parameters.get("fallback") else "ok"
    metrics.requests.labels(label, attempted, route, protocol, outcome).inc()
    metrics.latency.labels(label, attempted).observe(time.perf_counter() - started)
    metrics.rows.labels(label, attempted).inc(answer.rows)
    if batch.ignored_fields:
        metrics.ignored_fields.labels(label).inc(len(batch.ignored_fields))
    return Response(payload, media_type=media, headers=headers)


async def _audit(gateway: Gateway, model: str, answer: Answer, decoded: DecodedRequest, span: Span,
                 started: float) -> Response | None:
    """Record the answer in the audit log before it leaves; a 503 instead when the log is full and the
    policy says `reject` (nothing is answered unrecorded)."""
    served = gateway.snapshot.models.get(model)
    spec = served.policy.policy.audit if served is not None and served.policy is not None else None
    if spec is not None and not spec.enabled:
        return None
    attempted = str(answer.parameters.get("attempted_version", answer.version))
    entry = served.versions.get(attempted) if served is not None else None
    inputs = {name: _plain(c.values) for name, c in decoded.columns.items()}
    record = {
        "kind": "request", "time": time.time(), "request_id": answer.request_id, "trace_id": trace_id(span),
        "model": model, "version": answer.version, "attempted_version": attempted,
        "route": answer.parameters.get("route"),
        "inputs": gateway.redactor(model).apply(inputs),
        "outputs": {name: _plain(array) for name, array in answer.outputs.items()},
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
        return error_response(Unavailable(f"{exc}; the answer was withheld (audit.on_full: reject)"))
    return None


def _plain(values: Any) -> Any:
    """JSON-ready values (object arrays become lists; numeric arrays stay numpy for orjson)."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "O":
        return values.tolist()
    return values


@router.post("/v2/models/{model}/infer")
async def infer_v2(model: str, request: Request) -> Response:
    """OIP v2 inference on the model's current version."""
    return await _serve(request, "v2", model, None, _decode_v2, _encode_v2)


@router.post("/v2/models/{model}/versions/{version}/infer")
async def infer_v2_version(model: str, version: str, request: Request) -> Response:
    """OIP v2 inference pinned to one version."""
    return await _serve(request, "v2", model, version, _decode_v2, _encode_v2)


@router.post("/v1/models/{model}:predict")
async def predict_v1(model: str, request: Request) -> Response:
    """KServe v1 prediction: `{"instances": [{feature: value, ...}, ...]}`."""
    return await _serve(request, "v1", model, None, _decode_v1, _encode_v1)


@router.post("/v1/models/{model}/versions/{version}:predict")
async def predict_v1_version(model: str, version: str, request: Request) -> Response:
    """KServe v1 prediction pinned to one version."""
    return await _serve(request, "v1", model, version, _decode_v1, _encode_v1)
