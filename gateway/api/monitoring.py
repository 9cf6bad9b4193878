"""Monitoring routes: drift report and delayed-label feedback."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.body import read_body
from gateway.api.errors import error_response, json_response
from gateway.errors import GatewayError, MalformedRequest, Violation

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.monitoring import Monitoring
    from gateway.policy import Feedback

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
        result = gateway.monitor.feedback.accept(model, policy, items)
        if gateway.monitor.shared is not None:
            result = await _join_elsewhere(gateway.monitor, model, policy, items, result)
    except GatewayError as exc:
        return error_response(exc)
    metrics = gateway.metrics
    for version, count in result["by_version"].items():
        metrics.feedback_labels.labels(model, version).inc(count)
    for reason in ("unknown", "expired"):
        if result[reason]:
            metrics.feedback_unmatched.labels(model, reason).inc(len(result[reason]))
    return json_response(result)


async def _join_elsewhere(monitor: Monitoring, model: str, policy: Feedback, items: list[Any],
                          result: dict[str, Any]) -> dict[str, Any]:
    """Labels whose prediction another replica or worker made: take those predictions from Redis and
    join them here; predictions joined here are taken out of Redis (each is labelled once)."""
    shared = monitor.shared
    assert shared is not None
    skipped = {*result["unknown"], *result["expired"]} | {e.get("id") for e in result["invalid"]}
    joined_here = [i["id"] for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)
                   and i["id"] not in skipped]
    found = await asyncio.to_thread(shared.take, model, list(result["unknown"])) if result["unknown"] else {}
    if joined_here:
        await asyncio.to_thread(shared.forget, model, joined_here)
    if not found:
        return result
    for request_id, (version, scores) in found.items():
        monitor.feedback.remember(model, policy, request_id, version, scores)
    positions = [n for n, i in enumerate(items) if isinstance(i, dict) and i.get("id") in found]
    again = monitor.feedback.accept(model, policy, [items[n] for n in positions])
    by_version = dict(result["by_version"])
    for version, count in again["by_version"].items():
        by_version[version] = by_version.get(version, 0) + count
    return {"accepted": result["accepted"] + again["accepted"], "by_version": by_version,
            "unknown": [u for u in result["unknown"] if u not in found], "expired": result["expired"],
            "invalid": result["invalid"] + [{**e, "index": positions[e["index"]]} for e in again["invalid"]]}
