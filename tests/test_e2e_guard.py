"""Deadlines, breakers, fallback and fault injection through the real server (issue 3)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, RunningServer, good_row

pytestmark = pytest.mark.e2e

StartServer = Callable[..., RunningServer]
FAULTS_ON = {"GATEWAY_ALLOW_FAULT_INJECTION": "true"}


def write_policy(policies: Path, **changes: Any) -> None:
    """Rewrite the copied credit-risk policy with top-level sections replaced (None deletes)."""
    path = policies / "credit-risk.yaml"
    policy = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            policy.pop(key, None)
        else:
            policy[key] = value
    path.write_text(yaml.safe_dump(policy, sort_keys=False))


def predict(client: httpx.Client, rows: list[dict[str, Any]] | None = None, version: str | None = None,
            **headers: str) -> httpx.Response:
    path = f"/v1/models/{MODEL}:predict" if version is None else f"/v1/models/{MODEL}/versions/{version}:predict"
    return client.post(path, json={"instances": rows or [good_row()]}, headers=headers)


def breaker_state(client: httpx.Client, version: str) -> str:
    status = client.get("/status").json()
    (model,) = status["models"]
    (entry,) = [v for v in model["versions"] if v["version"] == version]
    return str(entry["breaker"]["state"])


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_client_deadline_is_answered_by_the_fallback_and_never_trips_the_breaker(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    write_policy(policies, guard={"timeout_ms": 400, "breaker": {"fail_max": 3, "reset_timeout_s": 0.6}},
                 faults=[{"version": "1", "delay_ms": 150, "delay_percent": 100}])
    server = start_server(models, policies, env=FAULTS_ON)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        # within the policy's 400 ms the slow version still answers
        assert predict(client).headers["x-route"] == "stable"
        # a client that can only wait 50 ms gets the fallback at its deadline, marked as such
        for _ in range(4):
            started = time.perf_counter()
            answer = predict(client, **{"X-Timeout-Ms": "50"})
            elapsed = time.perf_counter() - started
            assert answer.status_code == 200
            assert answer.headers["x-fallback"] == "timeout" and answer.headers["x-route"] == "fallback"
            body = answer.json()
            assert body["model_version"] == "fallback"
            assert body["parameters"]["fallback"] is True and body["parameters"]["fallback_reason"] == "timeout"
            assert body["parameters"]["attempted_version"] == "1"
            assert set(body["predictions"][0]) == {"label", "probabilities"}
            assert elapsed < 0.05 + 0.1, f"deadline overshot: {elapsed:.3f} s"
        # the client chose that deadline: the version is not at fault, its breaker stays closed
        assert breaker_state(client, "1") == "closed"
        assert predict(client).headers["x-route"] == "stable"
        assert metric(client, "gateway_fallbacks_total", model=MODEL, reason="timeout") == 4
        status = client.get("/status").json()["models"][0]
        assert "version 1 has fault injection active" in status["degraded_reasons"]


def test_a_version_past_the_policy_deadline_trips_its_breaker_and_recovers(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    write_policy(policies, guard={"timeout_ms": 100, "breaker": {"fail_max": 3, "reset_timeout_s": 0.6}},
                 faults=[{"version": "1", "delay_ms": 300, "delay_percent": 100}])
    server = start_server(models, policies, env=FAULTS_ON)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(3):
            started = time.perf_counter()
            answer = predict(client)
            assert answer.headers["x-fallback"] == "timeout", answer.headers
            assert time.perf_counter() - started < 0.1 + 0.1, "deadline overshot"
        # three timeouts at the policy's deadline: the breaker is open, and answers come at once
        assert breaker_state(client, "1") == "open"
        started = time.perf_counter()
        skipped = predict(client)
        assert skipped.headers["x-fallback"] == "circuit_open"
        assert time.perf_counter() - started < 0.1  # never waited for the slow version
        assert metric(client, "gateway_breaker_state", model=MODEL, version="1") == 2
        # after the reset timeout one trial goes through; still too slow, so the breaker opens again
        time.sleep(0.6)
        trial = predict(client)
        assert trial.headers["x-fallback"] == "timeout", trial.headers
        assert breaker_state(client, "1") == "open"
        assert metric(client, "gateway_breaker_transitions_total", model=MODEL, version="1", state="half-open") == 1
        assert metric(client, "gateway_fallbacks_total", model=MODEL, reason="timeout") == 4
        assert metric(client, "gateway_fallbacks_total", model=MODEL, reason="circuit_open") == 1


def test_an_erroring_version_trips_its_breaker_and_a_failed_trial_reopens_it(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    write_policy(policies, guard={"timeout_ms": 1000, "breaker": {"fail_max": 2, "reset_timeout_s": 0.3}},
                 faults=[{"version": "2", "error_percent": 100}])
    server = start_server(models, policies, env=FAULTS_ON)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        reasons = [predict(client, version="2").headers["x-fallback"] for _ in range(3)]
        assert reasons == ["runtime_error", "runtime_error", "circuit_open"]
        assert breaker_state(client, "2") == "open"
        # version 1 has its own breaker and keeps answering from the model
        assert predict(client).headers["x-route"] == "stable"
        time.sleep(0.3)
        assert predict(client, version="2").headers["x-fallback"] == "runtime_error"  # the trial fails
        assert breaker_state(client, "2") == "open"
        assert predict(client, version="2").headers["x-fallback"] == "circuit_open"


def test_without_a_fallback_clients_get_504_on_timeout_and_503_when_the_breaker_is_open(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    write_policy(policies, fallback=None, guard={"timeout_ms": 100, "breaker": {"fail_max": 1, "reset_timeout_s": 60}},
                 faults=[{"version": "1", "delay_ms": 5000, "delay_percent": 100}])
    server = start_server(models, policies, env=FAULTS_ON)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        started = time.perf_counter()
        timed_out = predict(client)
        assert timed_out.status_code == 504 and "deadline" in timed_out.json()["error"]
        assert time.perf_counter() - started < 1.0  # the 5 s injected hang did not hold the client
        blocked = predict(client)
        assert blocked.status_code == 503 and "circuit breaker" in blocked.json()["error"]
        # the hung worker was cancelled and freed: another version still answers right away
        assert predict(client, version="2").status_code == 200


def test_faults_are_refused_unless_the_server_allows_them(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    write_policy(policies, faults=[{"version": "1", "error_percent": 100}])
    server = start_server(models, policies)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert predict(client).headers["x-route"] == "stable"
        model = client.get("/status").json()["models"][0]
        assert any("fault injection" in r for r in model["degraded_reasons"])
        assert all(v["faults"] is None for v in model["versions"])


def test_concurrent_requests_while_the_breaker_flips_get_a_model_answer_or_a_marked_fallback(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    write_policy(policies, guard={"timeout_ms": 300, "breaker": {"fail_max": 3, "reset_timeout_s": 0.05}},
                 faults=[{"version": "1", "error_percent": 40, "delay_ms": 400, "delay_percent": 10}])
    server = start_server(models, policies, env=FAULTS_ON)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=limits) as client:
            calls = [client.post(f"/v1/models/{MODEL}:predict", json={"instances": [good_row()]})
                     for _ in range(200)]
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=60)

    answers = asyncio.run(burst())
    assert Counter(a.status_code for a in answers) == {200: 200}
    routes = Counter(a.headers["x-route"] for a in answers)
    assert set(routes) <= {"stable", "fallback"} and routes["stable"] > 0 and routes["fallback"] > 0
    for answer in answers:
        body = answer.json()
        fallback = answer.headers.get("x-fallback")
        assert (body["model_version"] == "fallback") == (fallback is not None)
        if fallback is not None:
            assert fallback in {"runtime_error", "circuit_open", "timeout"}
            assert body["parameters"]["fallback_reason"] == fallback
    with httpx.Client(base_url=server.url) as client:
        assert metric(client, "gateway_breaker_transitions_total", model=MODEL, version="1", state="open") >= 1
        assert metric(client, "gateway_requests_total", model=MODEL, outcome="error") == 0


def test_no_routable_version_is_answered_by_the_fallback_and_the_model_stays_ready(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    for version in ("1", "2"):
        (models / MODEL / version / "model.onnx").write_bytes(b"corrupt")
    server = start_server(models, policies)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/v2/health/ready").status_code == 200
        answer = predict(client, rows=[good_row(), {**good_row(), "debt_to_income": 0.9}])
        assert answer.status_code == 200 and answer.headers["x-fallback"] == "unavailable"
        body = answer.json()
        assert [p["label"] for p in body["predictions"]] == [0, 1]
        assert body["parameters"]["fallback_rules"] == "default,heavy-debt"
        bad = predict(client, rows=[{**good_row(), "age": 5}])
        assert bad.status_code == 422  # client errors are never papered over by the fallback
        model = client.get("/status").json()["models"][0]
        assert model["ready"] and not model["routable"] and model["degraded"]


def test_low_confidence_answers_are_marked_for_review(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        rows = [{**good_row(), "debt_to_income": d, "delinquencies_2y": k, "employment": e}
                for d in (0.1, 0.5, 0.8, 1.2) for k in (0, 2, 4) for e in ("salaried", "unemployed")]
        body = predict(client, rows=rows, version="2").json()
        scores = [p["probabilities"][1] for p in body["predictions"]]
        expected = [str(i) for i, s in enumerate(scores) if 0.45 <= s <= 0.55]
        marked = body["parameters"].get("low_confidence_rows", "")
        assert (marked.split(",") if marked else []) == expected
        assert expected, "the rows should include some near the cut-off"
        assert body["parameters"].get("review", False) is True
        assert body["model_version"] == "2" and body["parameters"]["route"] == "pinned"


def test_sigterm_lets_in_flight_requests_finish(repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    write_policy(policies, guard={"timeout_ms": 3000}, faults=[{"version": "1", "delay_ms": 700, "delay_percent": 100}])
    server = start_server(models, policies, env=FAULTS_ON)

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            pending = asyncio.create_task(client.post(f"/v1/models/{MODEL}:predict",
                                                      json={"instances": [good_row()]}))
            await asyncio.sleep(0.2)  # the request is in flight inside its 700 ms delay
            os.kill(server.process.pid, signal.SIGTERM)
            return await pending

    answer = asyncio.run(scenario())
    assert answer.status_code == 200 and answer.headers["x-route"] == "stable"
    # uvicorn drains, then re-raises the signal it caught, so the exit reads as "terminated by SIGTERM"
    assert server.process.wait(timeout=10) in (0, -signal.SIGTERM)
    log = server.output()
    assert "Waiting for application shutdown" in log and "Finished server process" in log
