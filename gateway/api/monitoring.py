"""Monitoring routes: drift report and delayed-label feedback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.body import read_body
from gateway.api.errors import error_response, json_response
from gateway.errors import GatewayError, MalformedRequest, Violation

if TYPE_CHECKING:
    from gateway.app import Gateway

router = APIRouter()


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


@router.get("/v2/models/{model}/drift")
async def drift(model: str, request: Request) -> Response:
    """Per version and feature: drift scores and states, window size, top drifting features; outcomes."""
    gateway = _gateway(request)
    try:
        if request.query_params.get("fresh") in ("1", "true"):
            await gateway.monitor.drain()
            return json_response(gateway.monitor.report(model, fresh=True))
        return json_response(gateway.monitor.report(model))
    except GatewayError as exc:
        return error_response(exc)


@router.post("/v2/models/{model}/feedback")
async def feedback(model: str, request: Request) -> Response:
    """Delayed true labels: `{"labels": [{"id": "<request id>", "label": 1}, {"id": ..., "labels": [0, 1]}]}`."""
    gateway = _gateway(request)
    try:
        served = gateway.snapshot.model(model)
        body = await read_body(request, gateway.settings.max_body_bytes)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise MalformedRequest([Violation("body", "malformed", "a JSON object", str(exc))]) from None
        items = payload.get("labels") if isinstance(payload, dict) else None
        if not isinstance(items, list):
            raise MalformedRequest([Violation("labels", "malformed", "a list of {id, label}", type(items).__name__)])
        policy = served.policy.policy.feedback if served.policy else None
        if policy is None:
            raise MalformedRequest([Violation("model", "malformed", "a model with a policy", "no policy")])
        result = await gateway.monitor.accept_feedback(model, policy, items)
    except GatewayError as exc:
        return error_response(exc)
    metrics = gateway.metrics
    for version, count in result["by_version"].items():
        metrics.feedback_labels.labels(model, version).inc(count)
    for reason in ("unknown", "expired"):
        if result[reason]:
            metrics.feedback_unmatched.labels(model, reason).inc(len(result[reason]))
    return json_response(result)

