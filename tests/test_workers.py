"""Several uvicorn workers in one container (`gateway serve --workers 2`) sharing a real Redis.

Each worker is its own process: control state flows between them through Redis as between
replicas, metrics are merged across them (whichever worker answers a scrape reports every worker's
counts), and each writes its own audit chain that verifies on its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.audit import chains, records
from tests.conftest import MODEL, ROOT, RunningServer, good_row
from tests.test_state_redis import RedisServer, redis_server  # noqa: F401  (the fixture)

TOKEN = "w" * 32
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PREDICT = f"/v1/models/{MODEL}:predict"


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`gateway serve` expected to refuse at once (a timeout, not a hang, if it started serving)."""
    return subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", *args], check=False,
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ, **(env or {})})


def test_several_workers_need_the_shared_state_store(tmp_path: Path) -> None:
    refused = _serve("--workers", "2", env={"GATEWAY_STATE_DIR": str(tmp_path / "state"),
                                            "GATEWAY_AUDIT_DIR": str(tmp_path / "audit")})
    assert refused.returncode == 2
    assert "workers > 1 needs state_store: redis" in refused.stderr


def test_two_gateways_never_write_one_audit_chain(tmp_path: Path) -> None:
    from gateway.workers import hold_single_writer

    audit = tmp_path / "audit"
    held = hold_single_writer(audit)  # as a running single-worker gateway holds it
    try:
        refused = _serve(env={"GATEWAY_STATE_DIR": str(tmp_path / "state"), "GATEWAY_AUDIT_DIR": str(audit)})
    finally:
        held.close()
    assert refused.returncode == 2
    assert f"{audit} is written by another gateway process" in refused.stderr


def test_a_second_supervisor_leaves_the_running_ones_metric_files_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.workers import prepare_metrics_dir

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # restored afterwards: prepare_metrics_dir sets it
    metrics = tmp_path / "metrics"
    held = prepare_metrics_dir(metrics)  # the running supervisor
    (metrics / "counter_4242.db").write_bytes(b"a running worker's counts")
    try:
        refused = _serve("--workers", "2", env={"GATEWAY_STATE_STORE": "redis", "GATEWAY_METRICS_DIR": str(metrics),
                                                "GATEWAY_STATE_DIR": str(tmp_path / "state"),
                                                "GATEWAY_AUDIT_DIR": str(tmp_path / "audit")})
    finally:
        held.close()
    assert refused.returncode == 2 and "is the metrics directory of a running gateway" in refused.stderr
    assert (metrics / "counter_4242.db").read_bytes() == b"a running worker's counts"


@pytest.fixture
def workers(ungated_repo: tuple[Path, Path], redis_server: RedisServer,  # noqa: F811
            tmp_path: Path) -> Iterator[RunningServer]:
    env = {"GATEWAY_WORKERS": "2", "GATEWAY_STATE_STORE": "redis", "GATEWAY_REDIS_URL": redis_server.url,
           "GATEWAY_ADMIN_TOKENS": f'[{{"name": "ops", "role": "admin", "token": "{TOKEN}"}}]'}
    running = RunningServer(*ungated_repo, env=env, state=tmp_path / "state")
    try:
        running.wait_live()
        _within(60.0, lambda: len(_children(running)) == 2 and _both_answer(running))
        yield running
    finally:
        running.stop()


def _children(server: RunningServer) -> list[int]:
    """The worker processes (uvicorn spawns them; multiprocessing's resource tracker is not one)."""
    pid = server.process.pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    workers = []
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(int(child))
        except OSError:
            continue  # ended meanwhile
    return workers


def _audit_dir(server: RunningServer) -> Path:
    return server.state.parent / f"{server.state.name}-audit"


def _requests_per_chain(server: RunningServer) -> dict[str, int]:
    return {chain.name: sum(1 for r in records(chain) if r.get("kind") == "request")
            for chain in chains(_audit_dir(server))}


SENT = [0]
"""Inference requests the tests sent (each answered `ok`), for exact totals."""


def _predict(server: RunningServer) -> httpx.Response:
    answer = httpx.post(server.url + PREDICT, json={"instances": [good_row()]}, timeout=10)
    assert answer.status_code == 200, answer.text
    SENT[0] += 1
    return answer


def _both_answer(server: RunningServer) -> bool:
    """True once both workers answered requests (fresh connections land on either)."""
    for _ in range(10):
        _predict(server)
    return len([n for n in _requests_per_chain(server).values() if n]) == 2


def _counted(server: RunningServer, outcome: str = "ok") -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    pattern = re.compile(rf'^gateway_requests_total{{[^}}]*outcome="{outcome}"[^}}]*}} (\S+)$', re.M)
    return sum(float(value) for value in pattern.findall(text))


def _within(seconds: float, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


@pytest.mark.e2e
def test_metrics_add_up_across_workers_whichever_answers_the_scrape(workers: RunningServer) -> None:
    before = _counted(workers)
    for _ in range(40):  # a fresh connection each: the kernel hands them to either worker
        _predict(workers)
    scrapes = {_counted(workers) for _ in range(10)}  # the scrapes, too, land on either worker
    assert scrapes == {before + 40}
    text = httpx.get(f"{workers.url}/metrics", timeout=10).text
    assert "process_resident_memory_bytes" not in text  # one process's view: left out with several workers
    assert float(re.search(r"^gateway_resident_memory_bytes (\S+)$", text, re.M).group(1)) > 50e6  # type: ignore[union-attr]
    assert re.search(r'^gateway_model_ready{model="credit-risk"} 1\.0$', text, re.M)
    assert re.search(r"^gateway_state_store_up 1\.0$", text, re.M)


@pytest.mark.e2e
def test_a_switch_through_one_worker_is_served_by_every_worker_within_a_second(workers: RunningServer) -> None:
    switched = httpx.post(f"{workers.url}/admin/models/{MODEL}/switch", json={"version": "2"}, headers=ADMIN)
    assert switched.status_code == 200, switched.text
    time.sleep(1.0)
    versions = {_predict(workers).headers["x-model-version"] for _ in range(30)}
    assert versions == {"2"}
    assert _requests_per_chain(workers)  # (both answered: the fixture waited for it)


@pytest.mark.e2e
def test_labels_find_their_predictions_whichever_worker_made_them(workers: RunningServer) -> None:
    ids = [f"w-{n}" for n in range(30)]
    for request_id in ids:  # fresh connections: both workers make some of these predictions
        answer = httpx.post(workers.url + PREDICT, json={"instances": [good_row()]},
                            headers={"X-Request-Id": request_id}, timeout=10)
        assert answer.status_code == 200
    time.sleep(0.5)  # predictions reach Redis within a tenth of a second
    body = httpx.post(f"{workers.url}/v2/models/{MODEL}/feedback", timeout=10,
                      json={"labels": [{"id": request_id, "label": 1} for request_id in ids]}).json()
    assert body["unknown"] == [] and body["accepted"] == 30


@pytest.mark.e2e
def test_each_worker_keeps_its_own_audit_chain_and_a_restarted_worker_continues_its_own(
        workers: RunningServer) -> None:
    victim = _children(workers)[0]
    counted, sent = _counted(workers), SENT[0]
    assert counted > 0
    metrics = workers.state / "metrics"
    assert list(metrics.glob(f"gauge_live*_{victim}.db"))
    os.kill(victim, signal.SIGKILL)  # uvicorn starts another worker, which takes the freed slot
    _within(60.0, lambda: victim not in _children(workers) and len(_children(workers)) == 2)
    _within(60.0, lambda: _both_answer(workers))
    # the dead worker's counts are kept (totals never go down), its live gauges are dropped
    assert _counted(workers) == counted + SENT[0] - sent
    _within(5.0, lambda: not list(metrics.glob(f"gauge_live*_{victim}.db")))
    workers.stop()
    audit = _audit_dir(workers)
    assert [c.name for c in chains(audit)] == ["worker-0", "worker-1"]
    verified = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(audit)],
                              check=False, capture_output=True, text=True, cwd=ROOT)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count(": ok: ") == 2
    shown = subprocess.run([sys.executable, "-m", "gateway", "audit", "show", str(audit), "--kind", "request"],
                           check=False, capture_output=True, text=True, cwd=ROOT)
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert {line["chain"] for line in lines} == {"worker-0", "worker-1"}
    assert [line["time"] for line in lines] == sorted(line["time"] for line in lines)  # merged in time order


def test_each_worker_takes_the_lowest_free_slot_and_a_freed_slot_is_taken_again(tmp_path: Path) -> None:
    from gateway.workers import claim_slot

    first, second = claim_slot(tmp_path), claim_slot(tmp_path)
    assert (first.number, second.number, second.name) == (0, 1, "worker-1")
    first.release()
    again = claim_slot(tmp_path)
    assert again.number == 0  # a restarted worker continues the dead one's chain
    again.release()
    second.release()


def test_the_audit_chains_of_a_directory_are_its_own_and_its_workers(tmp_path: Path) -> None:
    assert chains(tmp_path) == []
    for name in ("worker-10", "worker-2", "worker-x", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "audit-000000000001.jsonl").write_text("")
    assert [c.name for c in chains(tmp_path)] == [tmp_path.name, "worker-2", "worker-10"]


def test_verify_on_a_directory_without_audit_files_says_so(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["audit", "verify", str(tmp_path)]) == 0
    assert "no audit files" in capsys.readouterr().out


def _nodelay_of_accepted_connection(protocol: type) -> int:
    """Serve through a listener bound the way uvicorn's worker supervisor binds it (proto 0), and
    read TCP_NODELAY off the server side of an accepted keep-alive connection."""
    import asyncio
    import socket

    import uvicorn

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    async def run() -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # as uvicorn.Config.bind_socket does
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, http=protocol, lifespan="off", log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/")).text == "ok"
            connection = next(iter(server.server_state.connections))
            nodelay = connection.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                              socket.TCP_NODELAY)
        server.should_exit = True
        await serving
        return int(nodelay)

    return asyncio.run(run())


def test_connections_accepted_by_workers_send_at_once_without_waiting_for_acks() -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from gateway.workers import NoDelayHttpToolsProtocol

    # uvicorn's own protocol on a supervisor-bound listener leaves Nagle on: on Linux each
    # keep-alive answer then waits ~40 ms for the client's delayed ACK (measured: p50 44 ms
    # instead of 2 ms with two workers)
    assert _nodelay_of_accepted_connection(HttpToolsProtocol) == 0
    assert _nodelay_of_accepted_connection(NoDelayHttpToolsProtocol) == 1


def test_a_staging_gateway_never_inherits_the_shared_store_or_the_workers(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A readiness run started through a production worker must not write production's shared state
    (its rehearsal switches and rolls back) nor split its audit into worker chains."""
    from gateway.readiness.staging import StagingGateway
    from tests.conftest import MODELS, POLICIES

    monkeypatch.setenv("GATEWAY_STATE_STORE", "redis")
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    monkeypatch.setenv("GATEWAY_WORKERS", "2")
    monkeypatch.setenv("GATEWAY_METRICS_DIR", str(tmp_path / "metrics"))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    with StagingGateway(MODELS, POLICIES) as staging:
        status = httpx.get(f"{staging.url}/status", timeout=10).json()
        assert status["server"]["state_store"]["kind"] == "file" and status["server"]["degraded"] is False
        assert "process_resident_memory_bytes" in httpx.get(f"{staging.url}/metrics", timeout=10).text
        audit_dir = staging.audit_dir
        assert not (audit_dir / "worker-0").exists()


def test_workers_of_one_gateway_run_one_readiness_run_at_a_time(tmp_path: Path) -> None:
    import asyncio

    from gateway.locks import DirectoryBusy, hold
    from gateway.readiness.jobs import ReadinessRunner, RunRefused
    from tests.conftest import MODELS, POLICIES

    async def scenario() -> None:
        runner = ReadinessRunner(MODELS, POLICIES, tmp_path / "reports", lambda actor, summary: None,
                                 lock_dir=tmp_path / "state")
        elsewhere = hold(tmp_path / "state", ".readiness-run.lock", "")  # another worker's run
        with pytest.raises(RunRefused, match="another worker"):
            await runner.start(MODEL, "1", "ops")
        elsewhere.close()
        job = await runner.start(MODEL, "99", "ops")  # no such version: the run ends at once
        with pytest.raises(DirectoryBusy):
            hold(tmp_path / "state", ".readiness-run.lock", "")  # held while it runs
        while job.status == "running":
            await asyncio.sleep(0.05)
        assert job.status == "could_not_run"
        hold(tmp_path / "state", ".readiness-run.lock", "").close()  # free again for any worker
        await runner.close()

    asyncio.run(scenario())
