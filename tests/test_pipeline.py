"""The request recipe in process: client deadlines, overload, low confidence, fallback output selection."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import MODEL, good_row, make_client, patch_policy, v2_body


def policy_copy(repo_copy: tuple[Path, Path], **changes: Any) -> tuple[Path, Path]:
    models, policies = repo_copy
    path = policies / "credit-risk.yaml"
    policy = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        policy[key] = value
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return models, policies


def test_low_confidence_rows_can_be_answered_by_the_rules(repo_copy: tuple[Path, Path]) -> None:
    _, policies = repo_copy
    policy = yaml.safe_load((policies / "credit-risk.yaml").read_text())
    fallback = {**policy["fallback"], "low_confidence": {"band": [0.0, 0.05], "action": "fallback"}}
    with make_client(*policy_copy(repo_copy, fallback=fallback)) as client:
        rows = [{**good_row(), "income": 150000.0}, {**good_row(), "debt_to_income": 1.4, "delinquencies_2y": 3}]
        model_only = client.post(f"/v1/models/{MODEL}/versions/1:predict", json={"instances": rows})
        body = model_only.json()
        assert body["parameters"]["fallback_rows"] == "0", body  # the confident-looking row 0 is in the band
        assert body["parameters"]["fallback_reason"] == "low_confidence"
        assert body["predictions"][0] == {"label": 0, "probabilities": [0.88, 0.12]}  # the default rule
        assert body["predictions"][1]["probabilities"][1] > 0.05  # row 1 keeps the model's answer
        assert model_only.headers["x-fallback"] == "low_confidence"


def test_low_confidence_needs_the_score_even_when_only_the_label_is_asked_for(client: Any) -> None:
    rows = [{**good_row(), "debt_to_income": d, "delinquencies_2y": k} for d in (0.2, 0.7, 1.1) for k in (0, 3)]
    body = v2_body(rows, outputs=[{"name": "label"}])
    answer = client.post(f"/v2/models/{MODEL}/versions/2/infer", json=body).json()
    assert [o["name"] for o in answer["outputs"]] == ["label"]
    full = client.post(f"/v2/models/{MODEL}/versions/2/infer", json=v2_body(rows)).json()
    assert answer["parameters"].get("low_confidence_rows") == full["parameters"].get("low_confidence_rows")


def test_fallback_answers_respect_output_selection(repo_copy: tuple[Path, Path]) -> None:
    models, policies = repo_copy
    (models / MODEL / "1" / "model.onnx").write_bytes(b"broken")
    with make_client(models, policies) as client:
        body = v2_body([good_row()], outputs=[{"name": "probabilities"}])
        answer = client.post(f"/v2/models/{MODEL}/infer", json=body)
        assert answer.status_code == 200 and answer.headers["x-fallback"] == "unavailable"
        assert [o["name"] for o in answer.json()["outputs"]] == ["probabilities"]
        assert answer.json()["outputs"][0]["shape"] == [1, 2]
        bad = client.post(f"/v2/models/{MODEL}/infer", json=v2_body([good_row()], outputs=[{"name": "nope"}]))
        assert bad.status_code == 422 and "nope" in bad.json()["error"]


@pytest.mark.parametrize(("headers", "parameters"), [
    ({"X-Timeout-Ms": "-5"}, None),
    ({"X-Timeout-Ms": "soon"}, None),
    ({}, {"timeout_ms": 0}),
    ({}, {"timeout": "never"}),
])
def test_malformed_client_deadlines_are_400(client: Any, headers: dict[str, str],
                                            parameters: dict[str, Any] | None) -> None:
    body = v2_body([good_row()], **({"parameters": parameters} if parameters else {}))
    answer = client.post(f"/v2/models/{MODEL}/infer", json=body, headers=headers)
    assert answer.status_code == 400, answer.text


async def _held_app(repo_copy: tuple[Path, Path], **settings: Any) -> tuple[Any, threading.Event, threading.Event]:
    """A loaded app whose stable version's runs block until released (a hang injected on purpose),
    with the events `entered` (a run started) and `release`. The hang is a Python-level one, which
    only a worker thread can be walked away from, so the version runs on the pool."""
    models, policies = repo_copy
    patch_policy(policies, MODEL, guard={"execution": "thread"})
    app = create_app(Settings(models_dir=models, policies_dir=policies, state_dir=policies.parent / "state",
                              audit_dir=policies.parent / "audit", **settings))
    entered, release = threading.Event(), threading.Event()
    await app.state.gateway.load()
    model = app.state.gateway.snapshot.model(MODEL).resolve(None).entry.model
    original = model.run

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(5)
        return original(*args, **kwargs)

    model.run = held
    return app, entered, release


@pytest.mark.parametrize("how", ["header", "v2 timeout_ms", "triton timeout (us)"])
def test_a_client_deadline_shortens_the_policy_deadline(repo_copy: tuple[Path, Path], how: str) -> None:
    async def scenario() -> httpx.Response:
        app, _, release = await _held_app(repo_copy)
        gateway = app.state.gateway
        headers = {"X-Timeout-Ms": "30"} if how == "header" else {}
        parameters = {"header": None, "v2 timeout_ms": {"timeout_ms": 30}, "triton timeout (us)": {"timeout": 30000}}
        body = v2_body([good_row()], **({"parameters": parameters[how]} if parameters[how] else {}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            started = asyncio.get_running_loop().time()
            answer = await http.post(f"/v2/models/{MODEL}/infer", json=body, headers=headers)
            elapsed = asyncio.get_running_loop().time() - started
        release.set()
        gateway.close()
        assert elapsed < 0.2  # 30 ms asked for; the policy's 250 ms would have been longer
        return answer

    answer = asyncio.run(scenario())
    assert answer.status_code == 200 and answer.headers["x-fallback"] == "timeout"


def test_overload_is_answered_at_once_instead_of_queueing(repo_copy: tuple[Path, Path]) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        app, entered, release = await _held_app(repo_copy, max_queued_inferences=1)
        gateway = app.state.gateway
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            first = asyncio.create_task(http.post(f"/v2/models/{MODEL}/infer", json=v2_body([good_row()])))
            await asyncio.to_thread(entered.wait, 5)
            second = await http.post(f"/v2/models/{MODEL}/infer", json=v2_body([good_row()]))
            release.set()
            done = await first
        gateway.close()
        return done, second

    first, second = asyncio.run(scenario())
    assert first.status_code == 200 and "x-fallback" not in first.headers
    assert second.status_code == 200 and second.headers["x-fallback"] == "overloaded"
