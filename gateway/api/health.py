"""Health, metadata, status and metrics routes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.errors import error_response, json_response
from gateway.errors import GatewayError, Unavailable
from gateway.readiness.fingerprint import environment
from gateway.registry import ServedModel
from gateway.repository import ModelVersion, version_key

if TYPE_CHECKING:
    from gateway.app import Gateway

router = APIRouter()

SERVER_NAME = "safety-net-gateway"
EXTENSIONS = ["binary_tensor_data"]


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


@router.get("/v2/health/live")
async def live() -> Response:
    """Liveness: the process answers HTTP."""
    return json_response({"live": True})


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    """Readiness: every model can answer unversioned requests (503 with the reasons otherwise)."""
    snapshot = _gateway(request).snapshot
    if snapshot.ready:
        return json_response({"ready": True})
    reasons = snapshot.not_ready_reasons()
    return json_response({"ready": False, "error": "not ready: " + "; ".join(reasons), "reasons": reasons}, 503)


@router.get("/v2")
async def server_metadata(request: Request) -> Response:
    """OIP server metadata."""
    return json_response({"name": SERVER_NAME, "version": _gateway(request).version, "extensions": EXTENSIONS})


def _metadata(model: ServedModel, entry: ModelVersion) -> dict[str, object]:
    signature = entry.signature or (entry.card.signature if entry.card else None)
    return {
        "name": model.name,
        "versions": sorted(model.served, key=version_key),
        "platform": entry.card.platform if entry.card else "onnxruntime_onnx",
        "inputs": [t.model_dump() for t in signature.inputs] if signature else [],
        "outputs": [t.model_dump() for t in signature.outputs] if signature else [],
    }


@router.get("/v2/models/{model}")
async def model_metadata(model: str, request: Request) -> Response:
    """OIP model metadata of the model's current version."""
    try:
        served_model = _gateway(request).snapshot.model(model)
        served = served_model.resolve(None)
    except GatewayError as exc:
        return error_response(exc)
    return json_response(_metadata(served_model, served.entry))


@router.get("/v2/models/{model}/versions/{version}")
async def version_metadata(model: str, version: str, request: Request) -> Response:
    """OIP model metadata of one version (answered for failed versions too, from their card)."""
    try:
        served_model = _gateway(request).snapshot.model(model)
        entry = served_model.entry(version)
    except GatewayError as exc:
        return error_response(exc)
    body = _metadata(served_model, entry)
    body["versions"] = [version]
    return json_response(body)


def _ready_answer(name: str, is_ready: bool, reason: str) -> Response:
    if is_ready:
        return json_response({"name": name, "ready": True})
    return json_response({"name": name, "ready": False, "error": reason}, 503)


@router.get("/v2/models/{model}/ready")
async def model_ready(model: str, request: Request) -> Response:
    """Model readiness: 200 when unversioned requests can be answered, 503 with the reason if not."""
    try:
        served_model = _gateway(request).snapshot.model(model)
    except GatewayError as exc:
        return error_response(exc)
    return _ready_answer(model, served_model.ready, served_model.not_ready_reason)


@router.get("/v2/models/{model}/versions/{version}/ready")
async def version_ready(model: str, version: str, request: Request) -> Response:
    """Version readiness: 200 when the version serves, 503 with the reason if not."""
    try:
        served_model = _gateway(request).snapshot.model(model)
        served_model.resolve(version)
    except Unavailable as exc:
        return _ready_answer(model, False, exc.message)
    except GatewayError as exc:
        return error_response(exc)
    return _ready_answer(model, True, "")


@router.get("/v1/models/{model}")
async def model_status_v1(model: str, request: Request) -> Response:
    """KServe v1 model status."""
    try:
        served_model = _gateway(request).snapshot.model(model)
    except GatewayError as exc:
        return error_response(exc)
    return json_response({"name": model, "ready": served_model.ready})


@router.get("/status")
async def status(request: Request) -> Response:
    """Everything an operator wants at a glance: models, versions, policies, problems."""
    gateway = _gateway(request)
    snapshot = gateway.snapshot
    pipeline = gateway.pipeline
    models = []
    for model in snapshot.models.values():
        item = model.status()
        answered = pipeline.answered[model.name]
        by_reason = {r: n for (m, r), n in pipeline.fallbacks.items() if m == model.name}
        item["answers"] = {"total": answered, "fallbacks": by_reason,
                           "fallback_rate": round(sum(by_reason.values()) / answered, 6) if answered else 0.0}
        models.append(item)
    store = {**gateway.control.store.status(), "diverged": dict(gateway.control.diverged)}
    degraded = (bool(snapshot.policy_problems) or any(m["degraded"] for m in models) or not store["ok"]
                or bool(store["diverged"]))
    return json_response({
        "server": {"name": SERVER_NAME, "version": gateway.version, "ready": snapshot.ready,
                   "degraded": degraded, "in_flight": pipeline.in_flight,
                   "fault_injection_allowed": gateway.settings.allow_fault_injection,
                   "state_store": store,
                   "environment": environment()},
        "models": models,
        "policy_problems": snapshot.policy_problems,
    })


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    m = _gateway(request).metrics
    return Response(m.exposition(), media_type=m.content_type)
