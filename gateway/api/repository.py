"""The model repository extension of the protocol: index, load, unload (what tritonclient calls)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.errors import error_response, json_response
from gateway.errors import GatewayError, MalformedRequest, Violation
from gateway.repository import version_key

if TYPE_CHECKING:
    from gateway.app import Gateway

router = APIRouter(prefix="/v2/repository")


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def _versions(request: Request) -> list[str] | None:
    """Versions from `?version=` (tritonclient's query_params), `parameters.version`, or a Triton
    model config with `version_policy: {specific: {versions: [...]}}`; None means all."""
    if "version" in request.query_params:
        return [request.query_params["version"]]
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        body = orjson.loads(raw)
        parameters = body.get("parameters") or {}
        if "version" in parameters:
            return [str(parameters["version"])]
        if "config" in parameters:
            config = orjson.loads(parameters["config"])
            specific = config.get("version_policy", {}).get("specific", {}).get("versions")
            return [str(v) for v in specific] if specific else None
    except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
        raise MalformedRequest([Violation("body", "malformed", "a repository request", str(exc))]) from None
    return None


@router.post("/index")
async def index(request: Request) -> Response:
    """Every model version on disk and its state (READY / UNAVAILABLE with the reason)."""
    gateway = _gateway(request)
    try:
        gateway.tokens.require(request, "viewer")
        raw = await request.body()
        ready_only = bool(raw.strip()) and bool(orjson.loads(raw).get("ready"))
    except GatewayError as exc:
        return error_response(exc)
    except (orjson.JSONDecodeError, AttributeError) as exc:
        return error_response(MalformedRequest([Violation("body", "malformed", "a JSON object", str(exc))]))
    snapshot = gateway.snapshot
    rows: list[dict[str, Any]] = []
    for name, versions in gateway.repository.discover().items():
        model = snapshot.models.get(name)
        for version in sorted(versions, key=version_key):
            serving = model is not None and version in model.served
            if ready_only and not serving:
                continue
            row: dict[str, Any] = {"name": name, "version": version, "state": "READY" if serving else "UNAVAILABLE"}
            if not serving:
                row["reason"] = (model.version_reasons.get(version) if model else None) or "not loaded"
            rows.append(row)
    return json_response(rows)


@router.post("/models/{model}/load")
async def load(model: str, request: Request) -> Response:
    """Load (verify against the card, warm up) versions of a model; all new ones by default."""
    gateway = _gateway(request)
    try:
        actor = gateway.tokens.require(request, "admin")
        change = await gateway.control.load(model, await _versions(request), actor.name)
    except GatewayError as exc:
        return error_response(exc)
    return json_response(change.as_dict())


@router.post("/models/{model}/unload")
async def unload(model: str, request: Request) -> Response:
    """Stop serving versions; refused (409) for a version an alias points at."""
    gateway = _gateway(request)
    try:
        actor = gateway.tokens.require(request, "admin")
        change = await gateway.control.unload(model, await _versions(request), actor.name)
    except GatewayError as exc:
        return error_response(exc)
    return json_response(change.as_dict())
