"""Release control through the real server: switches under load, shadow, rollouts, restarts (issue 4).

Tests that switch or roll out run with the readiness gate off (`ungated_repo`): they are about the
mechanics of a release, not its approval (test_readiness_gate.py).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.http as triton
import yaml
from tritonclient.utils import InferenceServerException

from tests.conftest import MODEL, RunningServer, good_row

pytestmark = pytest.mark.e2e

StartServer = Callable[..., RunningServer]
TOKEN = "operator-and-admin-token"
ENV = {"GATEWAY_ADMIN_TOKENS": json.dumps([{"name": "release-bot", "role": "admin", "token": TOKEN}]),
       "GATEWAY_ALLOW_FAULT_INJECTION": "true"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_policy(policies: Path, **changes: Any) -> None:
    path = policies / "credit-risk.yaml"
    policy = yaml.safe_load(path.read_text())
    policy.update(changes)
    path.write_text(yaml.safe_dump({k: v for k, v in policy.items() if v is not None}, sort_keys=False))


def admin(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = client.request(method, path, json=body, headers=AUTH)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(step)


async def steady_load(url: str, seconds: float, concurrency: int = 16,
                      headers: Callable[[int], dict[str, str]] | None = None) -> list[httpx.Response]:
    """Closed-loop load: `concurrency` callers sending requests back to back for `seconds`."""
    answers: list[httpx.Response] = []
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=10,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def caller(n: int) -> None:
            i = 0
            while time.monotonic() < stop:
                extra = headers(n * 100_000 + i) if headers else {}
                answers.append(await client.post(f"/v1/models/{MODEL}:predict",
                                                 json={"instances": [good_row()]}, headers=extra))
                i += 1
        await asyncio.gather(*(caller(n) for n in range(concurrency)))
    return answers


def test_switches_under_load_lose_no_request(ungated_repo: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = ungated_repo
    server = start_server(models, policies, env=ENV)
    switch_times: list[float] = []

    async def scenario() -> list[httpx.Response]:
        load = asyncio.create_task(steady_load(server.url, 3.0))
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            for i in range(20):
                await asyncio.sleep(0.12)
                answer = await client.post(f"/admin/models/{MODEL}/switch",
                                           json={"version": "2" if i % 2 == 0 else "1"}, headers=AUTH)
                assert answer.status_code == 200, answer.text
                switch_times.append(answer.json()["took_ms"])
        return await load

    answers = asyncio.run(scenario())
    assert len(answers) > 200
    assert Counter(a.status_code for a in answers) == {200: len(answers)}
    versions = Counter(a.headers["x-model-version"] for a in answers)
    assert set(versions) == {"1", "2"}, versions
    assert all(a.headers["x-route"] == "stable" for a in answers)
    assert len(switch_times) == 20  # each switch's server-side time is reported (measured in loadtests/)


def test_a_hanging_shadow_never_changes_or_slows_answers_and_its_queue_stays_bounded(
        repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    write_policy(policies, routing={"stable": "1", "shadow": {"version": "2", "percent": 100}, "shadow_queue": 4},
                 faults=[{"version": "2", "delay_ms": 5000, "delay_percent": 100}])
    server = start_server(models, policies, env=ENV)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        reference = client.post(f"/v1/models/{MODEL}/versions/1:predict", json={"instances": [good_row()]}).json()
        started = time.perf_counter()
        answers = [client.post(f"/v1/models/{MODEL}:predict", json={"instances": [good_row()]}) for _ in range(40)]
        elapsed = time.perf_counter() - started
        assert all(a.status_code == 200 and a.headers["x-model-version"] == "1" for a in answers)
        assert all(a.json()["predictions"] == reference["predictions"] for a in answers)
        assert "x-fallback" not in answers[-1].headers
        assert elapsed < 5.0  # 40 answers did not wait for a shadow that hangs for 5 s each
        view = admin(client, "GET", f"/admin/models/{MODEL}")
        assert view["shadow"]["queued"] <= 4
        assert view["shadow"]["dropped"] >= 40 - 4 - 1
        metrics = client.get("/metrics").text
        assert 'gateway_shadow_requests_total{model="credit-risk",outcome="dropped",version="2"}' in metrics


def test_a_healthy_shadow_is_compared(repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    write_policy(policies, routing={"stable": "1", "shadow": {"version": "2", "percent": 100}})
    server = start_server(models, policies, env=ENV)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        rows = [{**good_row(), "debt_to_income": d / 10} for d in range(12)]
        for row in rows:
            assert client.post(f"/v1/models/{MODEL}:predict", json={"instances": [row]}).status_code == 200
        wait_for(lambda: admin(client, "GET", f"/admin/models/{MODEL}")["shadow"]["rows"] == len(rows), 5)
        shadow = admin(client, "GET", f"/admin/models/{MODEL}")["shadow"]
        assert 0 <= shadow["disagreement_rate"] <= 1
        assert 0 < shadow["max_abs_score_diff"] < 1 and shadow["mean_abs_score_diff"] <= shadow["max_abs_score_diff"]


def _rollout_policy(policies: Path, **extra: Any) -> None:
    write_policy(policies, rollout={"steps": [25, 100], "interval_s": 0.8, "min_requests": 15,
                                    "rollback_if": {"error_rate_gt": 0.05, "fallback_rate_gt": 0.05,
                                                    "p99_ratio_gt": None}}, **extra)


def test_a_worse_canary_is_rolled_back_within_one_interval(
        ungated_repo: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = ungated_repo
    _rollout_policy(policies, faults=[{"version": "2", "error_percent": 30}])
    server = start_server(models, policies, env=ENV)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        admin(client, "POST", f"/admin/models/{MODEL}/rollout", {"version": "2"})

        async def traffic_until_decided() -> list[httpx.Response]:
            return await steady_load(server.url, 1.5, concurrency=4)

        answers = asyncio.run(traffic_until_decided())
        rollout = admin(client, "GET", f"/admin/models/{MODEL}/rollout")["rollout"]
        assert rollout["status"] == "rolled_back", rollout
        assert "rate" in rollout["reason"]
        decision = rollout["history"][-1]
        assert decision["decision"] == "rollback" and decision["step"] == 0
        # decided before the first interval was over: within one interval of enough traffic
        assert decision["time"] - rollout["started_at"] < 0.8 + 0.5
        aliases = admin(client, "GET", f"/admin/models/{MODEL}")["aliases"]
        assert aliases["canary"] is None and aliases["stable"] == "1"
        assert all(a.status_code == 200 for a in answers)
        events = [e["action"] for e in admin(client, "GET", "/admin/events")["events"]]
        assert "rollout_start" in events and "rollout_rollback" in events


def test_a_healthy_canary_completes_its_rollout_and_becomes_stable(
        ungated_repo: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = ungated_repo
    _rollout_policy(policies)
    server = start_server(models, policies, env=ENV)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        admin(client, "POST", f"/admin/models/{MODEL}/rollout", {"version": "2"})
        answers = asyncio.run(steady_load(server.url, 3.0, concurrency=4))
        wait_for(lambda: admin(client, "GET", f"/admin/models/{MODEL}/rollout")["rollout"]["status"] != "running", 5)
        rollout = admin(client, "GET", f"/admin/models/{MODEL}/rollout")["rollout"]
        assert rollout["status"] == "completed", rollout
        assert [d["decision"] for d in rollout["history"]] == ["pass", "pass"]
        aliases = admin(client, "GET", f"/admin/models/{MODEL}")["aliases"]
        assert (aliases["stable"], aliases["previous_stable"], aliases["canary"]) == ("2", "1", None)
        routes = Counter(a.headers["x-route"] for a in answers)
        assert routes["canary"] > 0 and routes["stable"] > 0
        assert client.post(f"/v1/models/{MODEL}:predict",
                           json={"instances": [good_row()]}).headers["x-model-version"] == "2"
        # and the promotion is one rollback away from undone
        admin(client, "POST", f"/admin/models/{MODEL}/rollback")
        assert client.post(f"/v1/models/{MODEL}:predict",
                           json={"instances": [good_row()]}).headers["x-model-version"] == "1"


def test_a_restart_in_the_middle_of_a_rollout_resumes_it(
        ungated_repo: tuple[Path, Path], start_server: StartServer, tmp_path: Path) -> None:
    models, policies = ungated_repo
    write_policy(policies, rollout={"steps": [10, 50, 100], "interval_s": 30, "min_requests": 5})
    state = tmp_path / "state"
    first = start_server(models, policies, env=ENV, state=state)
    with httpx.Client(base_url=first.url, timeout=10) as client:
        admin(client, "POST", f"/admin/models/{MODEL}/rollout", {"version": "2"})
        admin(client, "POST", f"/admin/models/{MODEL}/rollout/pause")
        admin(client, "POST", f"/admin/models/{MODEL}/rollout/resume")
    first.stop()
    second = start_server(models, policies, env=ENV, state=state)
    with httpx.Client(base_url=second.url, timeout=10) as client:
        rollout = admin(client, "GET", f"/admin/models/{MODEL}/rollout")["rollout"]
        assert (rollout["status"], rollout["version"], rollout["percent"]) == ("running", "2", 10)
        view = admin(client, "GET", f"/admin/models/{MODEL}")
        assert view["alias_source"] == "state" and view["aliases"]["canary"] == "2"
        assert "resuming the rollout" in second.output()
        admin(client, "POST", f"/admin/models/{MODEL}/rollout/abort")
        assert admin(client, "GET", f"/admin/models/{MODEL}")["aliases"]["canary"] is None


def test_sticky_callers_stay_on_one_version(repo_copy: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = repo_copy
    write_policy(policies, routing={"stable": "1", "canary": {"version": "2", "percent": 50},
                                    "sticky_key": {"header": "X-Customer-Id"}})
    server = start_server(models, policies, env=ENV)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        seen: dict[str, set[str]] = {}
        for i in range(120):
            customer = f"C{i % 30:04d}"
            answer = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [good_row()]},
                                 headers={"X-Customer-Id": customer})
            seen.setdefault(customer, set()).add(answer.headers["x-route"])
        assert all(len(routes) == 1 for routes in seen.values())
        assert {r for routes in seen.values() for r in routes} == {"stable", "canary"}


def test_tritonclient_loads_and_unloads_versions(ungated_repo: tuple[Path, Path], start_server: StartServer) -> None:
    models, policies = ungated_repo
    shutil.copytree(models / MODEL / "2", models / MODEL / "3")
    card = models / MODEL / "3" / "model.yaml"
    card.write_text(card.read_text().replace("version: '2'", "version: '3'"))
    server = start_server(models, policies, env=ENV)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        index = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index(headers=AUTH)}
        assert index[(MODEL, "3")] == "READY"
        client.unload_model(MODEL, headers=AUTH, query_params={"version": "3"})
        assert not client.is_model_ready(MODEL, "3")
        with pytest.raises(InferenceServerException, match="stable"):
            client.unload_model(MODEL, headers=AUTH, query_params={"version": "1"})
        with pytest.raises(InferenceServerException, match="alias"):
            client.unload_model(MODEL, headers=AUTH)  # the whole model: refused while aliases point into it
        client.load_model(MODEL, headers=AUTH, query_params={"version": "3"})
        assert client.is_model_ready(MODEL, "3")
        with pytest.raises(InferenceServerException, match="token"):
            client.load_model(MODEL)  # no credentials
    finally:
        client.close()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        admin(http, "POST", f"/admin/models/{MODEL}/switch", {"version": "3"})
        assert http.post(f"/v1/models/{MODEL}:predict",
                         json={"instances": [good_row()]}).headers["x-model-version"] == "3"
