"""Admin API: aliases, switch, rollback, canary, shadow, rollouts and the event log (bearer tokens)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.errors import error_response, json_response
from gateway.errors import GatewayError, MalformedRequest, Violation

if TYPE_CHECKING:
    from gateway.app import Gateway

router = APIRouter(prefix="/admin")


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest([Violation("body", "malformed", "a JSON object", str(exc))]) from None
    if not isinstance(data, dict):
        raise MalformedRequest([Violation("body", "malformed", "a JSON object", type(data).__name__)])
    return data


def _version(body: dict[str, Any], required: bool = True) -> str | None:
    value = body.get("version")
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise MalformedRequest([Violation("version", "malformed", "a version name", repr(value))])
    return str(value)


def _percent(body: dict[str, Any], key: str = "percent", default: float | None = None) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise MalformedRequest([Violation(key, "malformed", "a percentage in [0, 100]", repr(value))])
    return float(value)


def _model_view(gateway: Gateway, name: str) -> dict[str, Any]:
    model = gateway.snapshot.model(name)
    status = model.status()
    shadow = model.aliases.shadow
    return {
        "name": name,
        "aliases": status["aliases"],
        "alias_source": status["alias_source"],
        "policy_aliases": status["policy_aliases"],
        "serving": sorted(model.served),
        "rollout": gateway.rollouts.status(name),
        "shadow": ({"version": shadow, **gateway.stats.shadow_summary(name, shadow),
                    "queued": gateway.shadow.depth(name), "dropped": gateway.shadow.dropped.get(name, 0)}
                   if shadow else None),
    }


async def _act(request: Request, role: str, action: Any) -> Response:
    gateway = _gateway(request)
    try:
        actor = gateway.tokens.require(request, role)
        result = await action(gateway, actor.name)
    except GatewayError as exc:
        return error_response(exc)
    return json_response(result)


@router.get("/models/{model}")
async def model_view(model: str, request: Request) -> Response:
    """Aliases (effective and as the policy declares them), rollout and shadow comparison."""
    async def view(gateway: Gateway, actor: str) -> dict[str, Any]:
        return _model_view(gateway, model)
    return await _act(request, "viewer", view)


@router.post("/models/{model}/switch")
async def switch(model: str, request: Request) -> Response:
    """Make a version stable at once (`{"version": "2"}`)."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        version = _version(await _body(request))
        assert version is not None
        return (await gateway.control.switch(model, version, actor)).as_dict()
    return await _act(request, "operator", act)


@router.post("/models/{model}/rollback")
async def rollback(model: str, request: Request) -> Response:
    """Back to the previous stable version (or, during a rollout, take traffic off the canary)."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        reason = str((await _body(request)).get("reason", ""))
        return (await gateway.control.rollback(model, actor, reason)).as_dict()
    return await _act(request, "operator", act)


@router.put("/models/{model}/canary")
async def set_canary(model: str, request: Request) -> Response:
    """Send `percent` of traffic to a canary version (`{"version": "2", "percent": 10}`)."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        body = await _body(request)
        return (await gateway.control.set_canary(model, _version(body), _percent(body), actor)).as_dict()
    return await _act(request, "operator", act)


@router.delete("/models/{model}/canary")
async def clear_canary(model: str, request: Request) -> Response:
    """Stop the canary."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        return (await gateway.control.set_canary(model, None, 0.0, actor)).as_dict()
    return await _act(request, "operator", act)


@router.put("/models/{model}/shadow")
async def set_shadow(model: str, request: Request) -> Response:
    """Mirror a share of requests to a shadow version (`{"version": "2", "percent": 100}`)."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        body = await _body(request)
        percent = _percent(body, default=100.0)
        return (await gateway.control.set_shadow(model, _version(body), percent, actor)).as_dict()
    return await _act(request, "operator", act)


@router.delete("/models/{model}/shadow")
async def clear_shadow(model: str, request: Request) -> Response:
    """Stop mirroring."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        return (await gateway.control.set_shadow(model, None, 0.0, actor)).as_dict()
    return await _act(request, "operator", act)


@router.get("/models/{model}/rollout")
async def rollout_status(model: str, request: Request) -> Response:
    """The rollout's state and its decisions so far."""
    async def view(gateway: Gateway, actor: str) -> dict[str, Any]:
        gateway.snapshot.model(model)
        return {"rollout": gateway.rollouts.status(model)}
    return await _act(request, "viewer", view)


@router.post("/models/{model}/rollout")
async def rollout_start(model: str, request: Request) -> Response:
    """Start the policy's rollout plan for a version (`{"version": "2"}`)."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        version = _version(await _body(request))
        assert version is not None
        await gateway.rollouts.start(model, version, actor)
        return {"rollout": gateway.rollouts.status(model)}
    return await _act(request, "operator", act)


@router.post("/models/{model}/rollout/{command}")
async def rollout_command(model: str, command: str, request: Request) -> Response:
    """`pause`, `resume` or `abort` the rollout."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        handlers = {"pause": gateway.rollouts.pause, "resume": gateway.rollouts.resume,
                    "abort": gateway.rollouts.abort}
        handler = handlers.get(command)
        if handler is None:
            raise MalformedRequest([Violation("command", "malformed", "pause, resume or abort", command)])
        await handler(model, actor)
        return {"rollout": gateway.rollouts.status(model)}
    return await _act(request, "operator", act)


@router.get("/events")
async def events(request: Request) -> Response:
    """The most recent control decisions (admin actions and automatic ones)."""
    async def view(gateway: Gateway, actor: str) -> dict[str, Any]:
        return {"events": list(gateway.control.events)}
    return await _act(request, "viewer", view)
