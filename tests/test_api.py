"""API behaviour in process: status, metrics, settings, and that inference never blocks the loop."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import MODEL, good_row, make_client, patch_policy, v2_body


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_status_lists_models_versions_and_policy(client: TestClient) -> None:
    body = client.get("/status").json()
    (model,) = body["models"]
    assert model["name"] == MODEL and model["ready"] and model["default_version"] == "1"
    assert [v["version"] for v in model["versions"]] == ["1", "2"]
    assert all(v["state"] == "ready" and v["golden_checked"] >= 10 for v in model["versions"])
    assert model["policy"]["source"].endswith("credit-risk.yaml") and len(model["policy"]["sha256"]) == 64
    assert body["policy_problems"] == []


def test_unversioned_requests_go_to_the_policy_stable_version(client: TestClient) -> None:
    answer = client.post(f"/v2/models/{MODEL}/infer", json=v2_body([good_row()]))
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "1"
    assert answer.json()["parameters"]["route"] == "stable"
    assert answer.headers["x-route"] == "stable"


def test_metrics_count_outcomes_rows_and_ignored_fields(client: TestClient) -> None:
    before = _samples(client)
    row = {**good_row(), "customer_id": "C42", "application_date": "2025-01-01"}
    assert client.post(f"/v1/models/{MODEL}:predict", json={"instances": [row, row]}).status_code == 200
    assert client.post(f"/v1/models/{MODEL}:predict",
                       json={"instances": [{**good_row(), "age": 7}]}).status_code == 422
    after = _samples(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("gateway_requests_total", model=MODEL, version="1", route="stable", protocol="v1", outcome="ok") == 1
    assert delta("gateway_requests_total", model=MODEL, version="", route="", protocol="v1", outcome="invalid") == 1
    assert delta("gateway_inference_rows_total", model=MODEL, version="1") == 2
    assert delta("gateway_ignored_fields_total", model=MODEL) == 2
    assert delta("gateway_validation_failures_total", model=MODEL, reason="range") == 1
    assert delta("gateway_request_duration_seconds_count", model=MODEL, version="1") == 1


def test_unknown_model_names_share_one_metric_label(client: TestClient) -> None:
    for name in ("nope-a", "nope-b"):
        assert client.post(f"/v2/models/{name}/infer", json=v2_body([good_row()])).status_code == 404
    models = {dict(labels)["model"] for (name, labels) in _samples(client) if name == "gateway_requests_total"}
    assert "nope-a" not in models and "_unknown" in models


def test_unknown_route_and_method_are_json_errors(client: TestClient) -> None:
    missing = client.get("/v2/nothing/here")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = client.get(f"/v2/models/{MODEL}/infer")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_body_limit_is_a_setting() -> None:
    with make_client(max_body_bytes=2048) as small:
        rows = [good_row()] * 30
        answer = small.post(f"/v2/models/{MODEL}/infer", json=v2_body(rows))
        assert answer.status_code == 413
        assert "2048" in answer.json()["error"]
        assert small.post(f"/v2/models/{MODEL}/infer", json=v2_body([good_row()])).status_code == 200


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "9123")
    monkeypatch.setenv("GATEWAY_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("GATEWAY_MAX_BODY_BYTES", "4096")
    settings = Settings()
    assert (settings.port, settings.models_dir, settings.max_body_bytes) == (9123, tmp_path, 4096)
    assert Settings(port=1234).port == 1234  # explicit values (CLI flags) win over the environment


def test_an_empty_repository_is_live_but_not_ready(tmp_path: Path) -> None:
    with make_client(models=tmp_path, policies=tmp_path) as empty:
        assert empty.get("/v2/health/live").status_code == 200
        ready = empty.get("/v2/health/ready")
        assert ready.status_code == 503
        assert "no models" in ready.json()["error"]


def test_a_slow_inference_does_not_block_other_requests(repo_copy: tuple[Path, Path]) -> None:
    """While one request's model run is held in its worker thread, the loop keeps answering."""
    models, policies = repo_copy
    patch_policy(policies, MODEL, guard={"execution": "thread"})

    async def scenario() -> None:
        app = create_app(Settings(models_dir=models, policies_dir=policies,
                                  state_dir=Path(tempfile.mkdtemp(prefix="gateway-state-")),
                                  audit_dir=Path(tempfile.mkdtemp(prefix="gateway-audit-"))))
        gateway = app.state.gateway
        await gateway.load()
        model = gateway.snapshot.model(MODEL).resolve(None).entry.model
        entered, release = threading.Event(), threading.Event()
        original = model.run

        def held_run(*args: Any, **kwargs: Any) -> Any:  # injected fault: a run that hangs until released
            entered.set()
            release.wait(timeout=30)
            return original(*args, **kwargs)

        model.run = held_run
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            slow = asyncio.create_task(http.post(f"/v2/models/{MODEL}/infer", json=v2_body([good_row()])))
            await asyncio.to_thread(entered.wait, 30)
            live = await http.get("/v2/health/live")
            meta = await http.get(f"/v2/models/{MODEL}")
            assert not slow.done()
            assert live.status_code == 200 and meta.status_code == 200
            release.set()
            assert (await slow).status_code == 200
        gateway.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_are_inflated(client: TestClient, encoding: str) -> None:
    import gzip
    import zlib

    raw = orjson_dumps(v2_body([good_row()]))
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    answer = client.post(f"/v2/models/{MODEL}/infer", content=packed, headers={"Content-Encoding": encoding})
    assert answer.status_code == 200, answer.text


def test_a_compressed_body_that_inflates_past_the_limit_is_refused() -> None:
    import gzip

    bomb = gzip.compress(b'{"inputs": [' + b" " * 5_000_000 + b"]}")
    assert len(bomb) < 2048 * 4
    with make_client(max_body_bytes=1 << 20) as small:
        answer = small.post(f"/v2/models/{MODEL}/infer", content=bomb, headers={"Content-Encoding": "gzip"})
        assert answer.status_code == 413 and "inflates" in answer.json()["error"]


def test_unknown_or_broken_encodings_are_client_errors(client: TestClient) -> None:
    body = orjson_dumps(v2_body([good_row()]))
    assert client.post(f"/v2/models/{MODEL}/infer", content=body, headers={"Content-Encoding": "br"}).status_code == 415
    broken = client.post(f"/v2/models/{MODEL}/infer", content=b"\x1f\x8b not gzip",
                         headers={"Content-Encoding": "gzip"})
    assert broken.status_code == 400 and "gzip" in broken.json()["error"]


def orjson_dumps(payload: Any) -> bytes:
    import orjson

    return orjson.dumps(payload)


def test_answers_are_the_protocol_wire_types(client: TestClient) -> None:
    """The server builds answers with orjson for speed; they must still parse as the spec's types."""
    from gateway.wire import ErrorResponse, InferenceResponse, ModelMetadata, ModelReady, ServerMetadata

    answer = InferenceResponse.model_validate(client.post(f"/v2/models/{MODEL}/infer",
                                                          json=v2_body([good_row()])).json())
    assert {o.name for o in answer.outputs} == {"label", "probabilities"} and answer.model_version == "1"
    assert ModelMetadata.model_validate(client.get(f"/v2/models/{MODEL}").json()).inputs
    assert ServerMetadata.model_validate(client.get("/v2").json()).name
    assert ModelReady.model_validate(client.get(f"/v2/models/{MODEL}/ready").json()).ready
    error = client.post(f"/v2/models/{MODEL}/infer", json=v2_body([{**good_row(), "age": 7}]))
    assert ErrorResponse.model_validate(error.json()).violations
