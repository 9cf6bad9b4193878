"""Several replicas sharing control state through a real Redis server (Debian's redis-server).

Two `gateway serve` processes on loopback with GATEWAY_STATE_STORE=redis: a switch on one is
served by the other within a second; with Redis stopped and started again under steady traffic, no
inference request fails, an admin change is refused (not half-applied) and /status says degraded;
when Redis is back the replicas reconcile and changes flow again.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.state import Aliases, ModelState
from gateway.state_redis import RedisStateStore
from tests.conftest import MODEL, RunningServer, good_row

TOKEN = "r" * 32
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """`redis-server` on a free loopback port, no persistence; can be stopped and started again."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("GATEWAY_REQUIRE_REDIS") == "1":
                pytest.fail("redis-server is required (GATEWAY_REQUIRE_REDIS=1): `make test` installs it")
            pytest.skip("redis-server is not installed (`make test` installs Debian's redis-server when it can)")
        self.binary = binary
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="gateway-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def test_the_store_saves_announces_and_reads_back(redis_server: RedisServer) -> None:
    store = RedisStateStore(redis_server.url, "t")
    state = ModelState(Aliases(stable="2", previous_stable="1"), "abc", None, 123.0)
    store.save(MODEL, state)
    assert store.load(MODEL) == state and store.load("other") is None
    assert store.status()["ok"] is True
    redis_server.stop()
    with pytest.raises(OSError, match="cannot be reached"):
        store.save(MODEL, state)
    assert store.load(MODEL) is None and store.status()["ok"] is False
    redis_server.start()
    assert store.load(MODEL) is None  # this test's server keeps nothing across restarts
    assert store.status()["ok"] is True
    store.close()


@pytest.fixture
def replicas(ungated_repo: tuple[Path, Path], redis_server: RedisServer,
             tmp_path: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    env = {"GATEWAY_STATE_STORE": "redis", "GATEWAY_REDIS_URL": redis_server.url,
           "GATEWAY_ADMIN_TOKENS": f'[{{"name": "ops", "role": "admin", "token": "{TOKEN}"}}]'}
    started = [RunningServer(*ungated_repo, env=env, state=tmp_path / f"state-{i}") for i in (1, 2)]
    try:
        for server in started:
            server.wait_live()
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


def _version(server: RunningServer) -> str:
    answer = httpx.post(f"{server.url}/v1/models/{MODEL}:predict", json={"instances": [good_row()]}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.headers["x-model-version"]


def _within(seconds: float, condition: Callable[[], bool]) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not within {seconds} s")


@pytest.mark.e2e
def test_a_switch_on_one_replica_is_served_by_the_other_within_a_second(
        replicas: tuple[RunningServer, RunningServer]) -> None:
    first, second = replicas
    assert _version(first) == _version(second) == "1"
    switched = httpx.post(f"{first.url}/admin/models/{MODEL}/switch", json={"version": "2"}, headers=ADMIN)
    assert switched.status_code == 200, switched.text
    _within(1.0, lambda: _version(second) == "2")
    httpx.post(f"{second.url}/admin/models/{MODEL}/rollback", json={"reason": "back"}, headers=ADMIN)
    _within(1.0, lambda: _version(first) == "1")
    events = httpx.get(f"{second.url}/admin/events", headers=ADMIN).json()["events"]
    assert any(e["action"] == "synced" and e["after"]["stable"] == "2" for e in events)


def _serves(server: RunningServer, version: str) -> bool:
    return httpx.get(f"{server.url}/v2/models/{MODEL}/versions/{version}/ready", timeout=10).status_code == 200


@pytest.mark.e2e
def test_an_unload_on_one_replica_holds_on_every_replica_and_on_one_started_later(
        replicas: tuple[RunningServer, RunningServer], ungated_repo: tuple[Path, Path], redis_server: RedisServer,
        tmp_path: Path) -> None:
    first, second = replicas
    assert _serves(first, "2") and _serves(second, "2")
    unloaded = httpx.post(f"{first.url}/v2/repository/models/{MODEL}/unload?version=2", headers=ADMIN)
    assert unloaded.status_code == 200, unloaded.text
    _within(1.5, lambda: not _serves(second, "2"))
    index = httpx.post(f"{second.url}/v2/repository/index", json={}, headers=ADMIN).json()
    assert index == [{"name": MODEL, "version": "1", "state": "READY"},
                     {"name": MODEL, "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"}]
    env = {"GATEWAY_STATE_STORE": "redis", "GATEWAY_REDIS_URL": redis_server.url}
    third = RunningServer(*ungated_repo, env=env, state=tmp_path / "state-3")
    try:
        third.wait_live()
        assert not _serves(third, "2") and _serves(third, "1")  # the fleet's unload holds for a newcomer
        loaded = httpx.post(f"{second.url}/v2/repository/models/{MODEL}/load?version=2", headers=ADMIN)
        assert loaded.status_code == 200, loaded.text
        for server in (first, third):
            _within(5.0, lambda server=server: _serves(server, "2"))  # loading takes a moment on each
    finally:
        third.stop()
    events = httpx.get(f"{second.url}/admin/events", headers=ADMIN).json()["events"]
    assert any(e["action"] == "unload" and e["actor"] == "state-store" for e in events)


@pytest.mark.e2e
def test_an_unload_that_cannot_be_stored_is_refused_and_changes_nothing(
        replicas: tuple[RunningServer, RunningServer], redis_server: RedisServer) -> None:
    first, _ = replicas
    redis_server.stop()
    refused = httpx.post(f"{first.url}/v2/repository/models/{MODEL}/unload?version=2", headers=ADMIN)
    assert refused.status_code == 503 and "cannot be reached" in refused.json()["error"]
    assert _serves(first, "2")


@pytest.mark.e2e
def test_a_label_reaching_another_replica_finds_its_prediction(
        replicas: tuple[RunningServer, RunningServer]) -> None:
    first, second = replicas
    predict = f"/v1/models/{MODEL}:predict"
    for n in range(3):
        answer = httpx.post(first.url + predict, json={"instances": [good_row()]}, headers={"X-Request-Id": f"r-{n}"})
        assert answer.status_code == 200 and answer.headers["x-request-id"] == f"r-{n}"
    feedback = f"/v2/models/{MODEL}/feedback"
    labels = {"labels": [{"id": "r-0", "label": 1}, {"id": "r-1", "label": 0}, {"id": "nobody", "label": 1}]}

    def joined() -> bool:  # predictions reach Redis within a tenth of a second
        body = httpx.post(second.url + feedback, json=labels).json()
        labels["labels"] = [item for item in labels["labels"] if item["id"] in body["unknown"]]
        return body["unknown"] == ["nobody"]

    _within(2.0, joined)
    again = httpx.post(second.url + feedback, json={"labels": [{"id": "r-0", "label": 1}]}).json()
    assert again["accepted"] == 0 and again["unknown"] == ["r-0"]  # labelled once
    twice = {"labels": [{"id": "r-2", "label": 1}, {"id": "r-2", "label": 1}]}  # made here, and in Redis
    local = httpx.post(first.url + feedback, json=twice).json()
    assert local["accepted"] == 1 and local["unknown"] == ["r-2"]  # the second label is not joined again
    taken = httpx.post(second.url + feedback, json={"labels": [{"id": "r-2", "label": 1}]}).json()
    assert taken["unknown"] == ["r-2"]  # joined where it was made: gone from Redis too
    samples = httpx.get(f"{second.url}/metrics").text
    assert 'gateway_feedback_labels_total{model="credit-risk",version="1"} 2.0' in samples


@pytest.mark.e2e
def test_without_redis_replicas_keep_serving_refuse_changes_and_reconcile_when_it_returns(
        replicas: tuple[RunningServer, RunningServer], redis_server: RedisServer) -> None:
    import threading

    first, second = replicas
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:  # steady traffic on both replicas through Redis going away and coming back
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                for server in (first, second):
                    try:
                        answer = client.post(f"{server.url}/v1/models/{MODEL}:predict",
                                             json={"instances": [good_row()]})
                        answers.append((answer.status_code, answer.headers.get("x-model-version", "")))
                    except httpx.HTTPError as exc:
                        answers.append((0, repr(exc)))

    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    try:
        time.sleep(0.5)
        redis_server.stop()
        refused = httpx.post(f"{first.url}/admin/models/{MODEL}/switch", json={"version": "2"}, headers=ADMIN)
        assert refused.status_code == 503 and "cannot be reached" in refused.json()["error"]
        assert _version(first) == "1"  # not half-applied
        _within(3.0, lambda: httpx.get(f"{second.url}/status").json()["server"]["state_store"]["ok"] is False)
        assert httpx.get(f"{second.url}/status").json()["server"]["degraded"] is True
        assert "gateway_state_store_up 0.0" in httpx.get(f"{second.url}/metrics").text  # GatewayStateStoreDown
        time.sleep(1.0)
        redis_server.start()
        for server in (first, second):
            _within(5.0, lambda server=server: httpx.get(f"{server.url}/status").json()["server"]["state_store"]["ok"])
        assert "gateway_state_store_up 1.0" in httpx.get(f"{second.url}/metrics").text
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join(timeout=15)
    assert len(answers) > 50
    assert set(answers) == {(200, "1")}  # every request answered, on the last known state
    switched = httpx.post(f"{first.url}/admin/models/{MODEL}/switch", json={"version": "2"}, headers=ADMIN)
    assert switched.status_code == 200, switched.text
    _within(1.5, lambda: _version(second) == "2")


@pytest.mark.e2e
def test_a_rollout_survives_killing_the_replica_that_drives_it(ungated_repo: tuple[Path, Path],
                                                               redis_server: RedisServer, tmp_path: Path) -> None:
    import signal
    import threading

    from tests.conftest import patch_policy

    models, policies = ungated_repo
    patch_policy(policies, MODEL, rollout={"steps": [50, 100], "interval_s": 3.0, "min_requests": 5,
                                           "rollback_if": {"p99_ratio_gt": None, "drift_alert": False}})
    env = {"GATEWAY_STATE_STORE": "redis", "GATEWAY_REDIS_URL": redis_server.url,
           "GATEWAY_ADMIN_TOKENS": f'[{{"name": "ops", "role": "admin", "token": "{TOKEN}"}}]'}
    first = RunningServer(models, policies, env=env, state=tmp_path / "state-1")
    second = RunningServer(models, policies, env=env, state=tmp_path / "state-2")
    stop = threading.Event()

    def traffic() -> None:  # both replicas see canary calls, as behind a load balancer
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                for server in (first, second):
                    with __import__("contextlib").suppress(httpx.HTTPError):
                        client.post(f"{server.url}/v1/models/{MODEL}:predict", json={"instances": [good_row()]})
                time.sleep(0.02)

    sender = threading.Thread(target=traffic, daemon=True)
    try:
        first.wait_live()
        second.wait_live()
        started = httpx.post(f"{first.url}/admin/models/{MODEL}/rollout", json={"version": "2"}, headers=ADMIN)
        assert started.status_code == 200, started.text
        sender.start()
        rollout_url = f"{second.url}/admin/models/{MODEL}/rollout"
        driver_url = f"{first.url}/admin/models/{MODEL}/rollout"
        _within(2.0, lambda: httpx.get(driver_url, headers=ADMIN).json()["rollout"]["driven_here"] is True)
        _within(1.0, lambda: httpx.get(rollout_url, headers=ADMIN).json()["rollout"]["status"] == "running")
        assert httpx.get(rollout_url, headers=ADMIN).json()["rollout"]["driven_here"] is False  # standing by
        first.process.send_signal(signal.SIGKILL)  # the driver dies without handing its lease over
        _within(30.0, lambda: httpx.get(rollout_url, headers=ADMIN).json()["rollout"]["status"] == "completed")
        taken_over = httpx.get(rollout_url, headers=ADMIN).json()["rollout"]
        assert taken_over["driven_here"] is False  # done: nobody drives it any more
        assert _version(second) == "2"
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(timeout=10)
        first.stop()
        second.stop()


@pytest.mark.e2e
def test_a_breaker_that_trips_on_one_replica_opens_on_the_other(ungated_repo: tuple[Path, Path],
                                                                redis_server: RedisServer, tmp_path: Path) -> None:
    from tests.conftest import patch_policy

    models, policies = ungated_repo
    patch_policy(policies, MODEL, faults=[{"version": "2", "error_percent": 100}])
    env = {"GATEWAY_STATE_STORE": "redis", "GATEWAY_REDIS_URL": redis_server.url}
    failing = RunningServer(models, policies, env={**env, "GATEWAY_ALLOW_FAULT_INJECTION": "true"},
                            state=tmp_path / "state-1")
    healthy = RunningServer(models, policies, env=env, state=tmp_path / "state-2")  # faults refused here
    pinned = f"/v1/models/{MODEL}/versions/2:predict"
    try:
        failing.wait_live()
        healthy.wait_live()
        body = {"instances": [good_row()]}
        assert "x-fallback" not in httpx.post(healthy.url + pinned, json=body).headers  # v2 answers here
        for _ in range(6):  # fail_max 5: the sixth finds the breaker open
            httpx.post(failing.url + pinned, json=body)
        assert httpx.post(failing.url + pinned, json=body).headers.get("x-fallback") == "circuit_open"
        _within(1.0, lambda: httpx.post(healthy.url + pinned, json=body).headers.get("x-fallback") == "circuit_open")
        status = httpx.get(f"{healthy.url}/status").json()
        version = next(v for m in status["models"] for v in m["versions"] if v["version"] == "2")
        assert version["breaker"]["state"] == "open"
    finally:
        failing.stop()
        healthy.stop()


def test_an_error_reply_is_told_apart_from_an_unreachable_redis(redis_server: RedisServer) -> None:
    import redis

    store = RedisStateStore(redis_server.url, "t")
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")  # every write is now answered with an OOM error reply
    state = ModelState(Aliases(stable="2", previous_stable="1"), "abc", None, 123.0)
    with pytest.raises(OSError, match=r"refused the change: .*maxmemory") as refused:
        store.save(MODEL, state)
    assert "cannot be reached" not in str(refused.value)
    assert store.status()["ok"] is False and "maxmemory" in store.status()["error"]
    admin.config_set("maxmemory", "0")
    store.save(MODEL, state)
    assert store.status()["ok"] is True
    admin.close()
    store.close()
