"""Admin API: aliases, switch, rollback, canary, shadow, rollouts, readiness reports and the event log
(bearer tokens)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.auth import Forbidden
from gateway.api.body import read_body
from gateway.api.errors import error_response, json_response
from gateway.errors import GatewayError, MalformedRequest, NotFound, Violation
from gateway.readiness import render
from gateway.readiness.store import MAX_REPORT_BYTES
from gateway.repository import version_key

if TYPE_CHECKING:
    from gateway.app import Gateway

router = APIRouter(prefix="/admin")


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def _body(request: Request, limit: int | None = None) -> dict[str, Any]:
    """The JSON object sent (empty body: {}); 413 beyond `limit` bytes (default: the request limit)."""
    raw = await read_body(request, limit or _gateway(request).settings.max_body_bytes)
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


def _force(gateway: Gateway, request: Request, body: dict[str, Any]) -> bool:
    """`force` (past the readiness gate): a JSON boolean, and true only from an admin."""
    value = body.get("force", False)
    if not isinstance(value, bool):
        raise MalformedRequest([Violation("force", "malformed", "true or false", repr(value))])
    if value:
        try:
            gateway.tokens.require(request, "admin")
        except Forbidden as exc:
            raise Forbidden(f"force (promotion without a passing readiness report) needs the admin role: "
                            f"{exc.message}") from None
    return value


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


async def _act(request: Request, role: str, action: Any, status: int = 200) -> Response:
    gateway = _gateway(request)
    try:
        actor = gateway.tokens.require(request, role)
        result = await action(gateway, actor.name)
    except GatewayError as exc:
        return error_response(exc)
    return json_response(result, status)


@router.get("/models/{model}")
async def model_view(model: str, request: Request) -> Response:
    """Aliases (effective and as the policy declares them), rollout and shadow comparison."""
    async def view(gateway: Gateway, actor: str) -> dict[str, Any]:
        return _model_view(gateway, model)
    return await _act(request, "viewer", view)


@router.post("/models/{model}/switch")
async def switch(model: str, request: Request) -> Response:
    """Make a version stable at once (`{"version": "2"}`; `"force": true` past the readiness gate: admin)."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        body = await _body(request)
        version = _version(body)
        assert version is not None
        force = _force(gateway, request, body)
        return (await gateway.control.switch(model, version, actor, force)).as_dict()
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
    """Start the policy's rollout plan for a version (`{"version": "2"}`; `"force": true`: admin)."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        body = await _body(request)
        version = _version(body)
        assert version is not None
        force = _force(gateway, request, body)
        await gateway.rollouts.start(model, version, actor, force)
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


@router.put("/readiness")
async def upload_report(request: Request) -> Response:
    """Store a readiness report (its JSON form) for the promotion gate; 201 with its summary."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        report = await _body(request, MAX_REPORT_BYTES)
        if isinstance(report.get("model"), str):
            gateway.snapshot.model(report["model"])  # reports only for models served here (404)
        summary = await asyncio.to_thread(gateway.reports.put, report)
        gateway.control.record(actor, summary["model"], "readiness_report", None, summary)
        return summary
    return await _act(request, "operator", act, status=201)


@router.get("/models/{model}/readiness")
async def readiness(model: str, request: Request) -> Response:
    """The model's gate, its stored reports (newest first) and the passing report of each serving version."""
    async def view(gateway: Gateway, actor: str) -> dict[str, Any]:
        served = gateway.snapshot.model(model)
        policy = served.policy
        section = policy.policy.readiness if policy is not None else None
        policy_sha = policy.sha256 if policy is not None else ""
        reports = await asyncio.to_thread(gateway.reports.summaries, model)
        versions = {}
        for version, entry in sorted(served.served.items(), key=lambda item: version_key(item[0])):
            sha = entry.entry.sha256
            found = await asyncio.to_thread(gateway.reports.passing, model, version, sha, policy_sha)
            versions[version] = {"model_sha256": sha, "passing": found["sha256"] if found else None}
        return {"model": model, "gate": section.gate if section is not None else "absent",
                "policy_sha256": policy_sha or None, "reports": reports, "versions": versions}
    return await _act(request, "viewer", view)


@router.post("/models/{model}/versions/{version}/readiness")
async def readiness_run(model: str, version: str, request: Request) -> Response:
    """Run the readiness checklist for a version in a child process (`{"scale": 0.1}` for a short run);
    202 at once, then watch `GET /admin/readiness/runs`. One run at a time (409 while one is going)."""
    async def act(gateway: Gateway, actor: str) -> dict[str, Any]:
        body = await _body(request)
        scale = body.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 10:
            raise MalformedRequest([Violation("scale", "malformed", "a number in (0, 10]", repr(scale))])
        gateway.snapshot.model(model).entry(version)  # 404 for a model or version not known here
        job = await gateway.readiness_runs.start(model, version, actor, float(scale))
        gateway.control.record(actor, model, "readiness_run", None, {"run": job.id, "version": version,
                                                                      "scale": job.scale})
        return {"run": job.view()}
    return await _act(request, "operator", act, status=202)


@router.get("/readiness/runs")
async def readiness_runs(request: Request) -> Response:
    """Checklist runs started here (the last 20), newest first, with their output and outcome."""
    async def view(gateway: Gateway, actor: str) -> dict[str, Any]:
        return {"runs": [job.view() for job in reversed(gateway.readiness_runs.jobs)]}
    return await _act(request, "viewer", view)


@router.get("/models/{model}/readiness/{sha256}")
async def readiness_report(model: str, sha256: str, request: Request) -> Response:
    """A stored report: JSON, or `?format=html` (one self-contained page) / `?format=markdown`."""
    gateway = _gateway(request)
    try:
        gateway.tokens.require(request, "viewer")
        report = await asyncio.to_thread(gateway.reports.report, model, sha256)
        if report is None:
            raise NotFound(f"no stored readiness report {sha256[:12]} for model {model!r}")
        wanted = request.query_params.get("format", "json")
        if wanted not in ("json", "html", "markdown"):
            raise MalformedRequest([Violation("format", "malformed", "json, html or markdown", wanted)])
    except GatewayError as exc:
        return error_response(exc)
    if wanted == "html":
        return Response(render.html(report), media_type="text/html; charset=utf-8")
    if wanted == "markdown":
        return Response(render.markdown(report), media_type="text/markdown; charset=utf-8")
    return json_response(report)


@router.get("/events")
async def events(request: Request) -> Response:
    """The most recent control decisions (admin actions and automatic ones)."""
    async def view(gateway: Gateway, actor: str) -> dict[str, Any]:
        return {"events": list(gateway.control.events)}
    return await _act(request, "viewer", view)
