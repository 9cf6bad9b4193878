"""The audit log through real `gateway serve` processes: one record per answer, redaction, SIGTERM and
kill -9 under load, and a full queue with `on_full: reject` or `drop`.

Servers write to an explicit GATEWAY_AUDIT_DIR; the log is read back with `gateway audit show` and
`gateway audit verify` (in-process via `gateway.cli.main`, and once as a real command).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import cli
from gateway.audit import Verdict, records, verify
from tests.conftest import MODEL, MODELS, POLICIES, ROOT, RunningServer, good_row, v2_body

pytestmark = pytest.mark.e2e

StartServer = Callable[..., RunningServer]
TOKEN = "audit-e2e-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_ENV = {"GATEWAY_ADMIN_TOKENS": json.dumps([{"name": "release-bot", "role": "admin", "token": TOKEN}])}
HMAC_KEY = "e2e-audit-hmac-key-0123456789"
PREDICT = f"/v1/models/{MODEL}:predict"
INFER = f"/v2/models/{MODEL}/infer"


# ------------------------------------------------------------------------------------------- helpers


def row(**changes: Any) -> dict[str, Any]:
    return {**good_row(), **changes}


def with_audit_policy(policies: Path, audit: dict[str, Any]) -> Path:
    """A copy of the bundled policies whose credit-risk policy has this `audit` section."""
    policies.mkdir(parents=True, exist_ok=True)
    document = yaml.safe_load((POLICIES / f"{MODEL}.yaml").read_text())
    document["audit"] = audit
    (policies / f"{MODEL}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return policies


def show(capsys: pytest.CaptureFixture[str], directory: Path, *filters: str) -> list[dict[str, Any]]:
    """`gateway audit show DIRECTORY FILTERS...` as parsed records."""
    code = cli.main(["audit", "show", str(directory), *filters])
    out, _ = capsys.readouterr()
    assert code == 0
    return [json.loads(line) for line in out.splitlines()]


def verify_command(directory: Path) -> tuple[int, str]:
    """The real `gateway audit verify` command: exit code and output."""
    done = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(directory)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, done.stdout + done.stderr


def request_records(directory: Path) -> list[dict[str, Any]]:
    return [r for r in records(directory) if r["kind"] == "request"]


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def flat(values: Any) -> list[float]:
    return [float(v) for v in np.ravel(np.asarray(values, dtype=np.float64))]


@dataclass
class Load:
    """What concurrent callers saw: the ids of 200 answers, other statuses, transport errors."""

    ok: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    errors: int = 0


async def drive(server: RunningServer, seconds: float, callers: int, signal_after: float | None = None,
                signum: int = signal.SIGTERM) -> Load:
    """`callers` closed-loop clients for `seconds` (or until the server exits); optionally signal the server
    once `signal_after` seconds have passed and answers are flowing."""
    seen = Load()
    started = time.monotonic()
    stop = started + seconds

    async with httpx.AsyncClient(base_url=server.url, timeout=10,
                                 limits=httpx.Limits(max_connections=callers)) as client:
        async def caller(n: int) -> None:
            i = 0
            while time.monotonic() < stop and server.process.poll() is None:
                i += 1
                try:
                    answer = await client.post(PREDICT, json={"instances": [row(income=1000.0 * n + i)]},
                                               headers={"X-Request-Id": f"load-{n}-{i}"})
                except httpx.HTTPError:
                    seen.errors += 1
                    await asyncio.sleep(0.01)
                    continue
                seen.statuses.append(answer.status_code)
                if answer.status_code == 200:
                    seen.ok.append(answer.json()["id"])

        async def signaller() -> None:
            if signal_after is None:
                return
            while time.monotonic() - started < signal_after or len(seen.ok) < 20:
                assert time.monotonic() < stop, "no answers before the signal was due"
                await asyncio.sleep(0.01)
            server.process.send_signal(signum)

        await asyncio.gather(signaller(), *(caller(n) for n in range(callers)))
    return seen


def only_torn_at_end(verdict: Verdict, newest: Path) -> bool:
    """A verdict that is clean, or broken only by a torn last line of `newest`."""
    fatal = [f for f in verdict.findings if f.fatal]
    return not fatal or (len(fatal) == 1 and fatal[0].file == newest.name and "torn" in fatal[0].problem)


# ---------------------------------------------------------------------- one record per answered request


@dataclass
class Sent:
    request_id: str
    version: str
    route: str
    trace_id: str
    outputs: dict[str, list[float]]
    income: float


def v1_sent(answer: httpx.Response, version: str, route: str, income: float) -> Sent:
    assert answer.status_code == 200, answer.text
    body = answer.json()
    predictions = body["predictions"]
    outputs = {"label": flat([p["label"] for p in predictions]),
               "probabilities": flat([p["probabilities"] for p in predictions])}
    return Sent(body["id"], version, route, answer.headers["x-trace-id"], outputs, income)


def v2_sent(answer: httpx.Response, version: str, route: str, income: float) -> Sent:
    assert answer.status_code == 200, answer.text
    body = answer.json()
    outputs = {o["name"]: flat(o["data"]) for o in body["outputs"]}
    return Sent(body["id"], version, route, answer.headers["x-trace-id"], outputs, income)


def test_every_answered_request_and_control_decision_is_recorded_once(
        start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        ungated_policies: Path) -> None:
    audit = tmp_path / "audit"
    # the readiness gate is off: the switch is here to be audited, not approved (test_readiness_gate.py)
    server = start_server(MODELS, ungated_policies, env={**ADMIN_ENV, "GATEWAY_AUDIT_DIR": str(audit)})
    sent: list[Sent] = []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        status = http.get("/status").json()
        described = next(m for m in status["models"] if m["name"] == MODEL)
        policy_sha = described["policy"]["sha256"]
        model_sha = {v["version"]: v["sha256"] for v in described["versions"]}
        assert described["aliases"]["stable"] == "1"

        for i in range(3):
            income = 50_000.0 + i
            sent.append(v1_sent(http.post(PREDICT, json={"instances": [row(income=income)]},
                                          headers={"X-Request-Id": f"e2e-v1-{i}"}), "1", "stable", income))
            income = 60_000.0 + i
            sent.append(v2_sent(http.post(INFER, json=v2_body([row(income=income)], id=f"e2e-v2-{i}")),
                                "1", "stable", income))
        sent.append(v1_sent(http.post(f"/v1/models/{MODEL}/versions/2:predict",
                                      json={"instances": [row(income=70_000.0)]},
                                      headers={"X-Request-Id": "e2e-pinned"}), "2", "pinned", 70_000.0))
        fallback = http.post(PREDICT, json={"instances": [row(income=71_000.0)]},
                             headers={"X-Request-Id": "e2e-fallback", "X-Timeout-Ms": "0.001"})
        assert fallback.headers.get("x-fallback") == "timeout"
        sent.append(v1_sent(fallback, "fallback", "fallback", 71_000.0))
        refused = http.post(PREDICT, json={"instances": [row(age=5)]}, headers={"X-Request-Id": "e2e-refused"})
        assert refused.status_code == 422  # not answered by a model: no record

        switched = http.post(f"/admin/models/{MODEL}/switch", json={"version": "2"}, headers=AUTH)
        assert switched.status_code == 200, switched.text
        income = 80_000.0
        sent.append(v1_sent(http.post(PREDICT, json={"instances": [row(income=income)]},
                                      headers={"X-Request-Id": "e2e-after-switch"}), "2", "stable", income))
    server.stop()  # drains the queue

    assert len({s.request_id for s in sent}) == len(sent)
    for s in sent:
        found = show(capsys, audit, "--request-id", s.request_id)
        assert len(found) == 1, s.request_id
        rec = found[0]
        assert rec["kind"] == "request"
        assert (rec["model"], rec["version"], rec["route"]) == (MODEL, s.version, s.route)
        assert rec["trace_id"] == s.trace_id
        assert sorted(rec["outputs"]) == sorted(s.outputs)
        for name, values in s.outputs.items():
            assert flat(rec["outputs"][name]) == pytest.approx(values, abs=1e-6)
        assert isinstance(rec["latency_ms"], float)
        assert rec["latency_ms"] > 0
        assert rec["policy_sha256"] == policy_sha
        assert rec["model_sha256"] == model_sha["1" if s.version == "fallback" else s.version]
        assert rec["inputs"]["income"] == [s.income]
        assert rec["fallback_reason"] == ("timeout" if s.route == "fallback" else None)
    assert show(capsys, audit, "--request-id", "e2e-refused") == []
    assert len(show(capsys, audit, "--kind", "request")) == len(sent)

    switches = [r for r in show(capsys, audit, "--kind", "control") if r["action"] == "switch"]
    assert len(switches) == 1
    assert switches[0]["actor"] == "release-bot"
    assert switches[0]["model"] == MODEL
    assert (switches[0]["before"]["stable"], switches[0]["after"]["stable"]) == ("1", "2")

    code, output = verify_command(audit)
    assert code == 0, output
    assert "ok:" in output


# ----------------------------------------------------------------------------------------- redaction


@dataclass
class Redacted:
    audit: Path
    data: bytes


@pytest.fixture(scope="module")
def redacted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redacted]:
    """A server with `redact: {income: hash, employment: mask, age: drop}` after a few requests."""
    base = tmp_path_factory.mktemp("redaction")
    policies = with_audit_policy(base / "policies", {"redact": {"income": "hash", "employment": "mask",
                                                                "age": "drop"}})
    audit = base / "audit"
    server = RunningServer(MODELS, policies, env={"GATEWAY_AUDIT_DIR": str(audit),
                                                  "GATEWAY_AUDIT_HMAC_KEY": HMAC_KEY}, state=base / "state")
    try:
        server.wait_live()
        with httpx.Client(base_url=server.url, timeout=10) as http:
            bodies = [
                (PREDICT, {"instances": [row(income=73519.25, employment="self_employed", age=93)]}, "same-v1"),
                (INFER, v2_body([row(income=73519.25, employment="retired", age=94)]), "same-v2"),
                (PREDICT, {"instances": [row(income=88123.5, employment="retired", age=93)]}, "other"),
                (PREDICT, {"instances": [row(income=58000)]}, "int"),
                (PREDICT, {"instances": [row(income=58000.0)]}, "float"),
            ]
            for path, body, request_id in bodies:
                answer = http.post(path, json=body, headers={"X-Request-Id": request_id})
                assert answer.status_code == 200, answer.text
    finally:
        server.stop()
    yield Redacted(audit, b"".join(p.read_bytes() for p in sorted(audit.glob("audit-*.jsonl"))))


def income_of(redacted: Redacted, request_id: str) -> str:
    found = [r for r in records(redacted.audit) if r.get("request_id") == request_id]
    assert len(found) == 1
    value: str = found[0]["inputs"]["income"][0]
    return value


def test_redacted_values_never_reach_the_audit_files(redacted: Redacted) -> None:
    assert verify(redacted.audit).ok
    for raw in (b"73519.25", b"88123.5", b"self_employed", b"retired", b"salaried", b'"age":'):
        assert raw not in redacted.data, raw
    reqs = request_records(redacted.audit)
    assert len(reqs) == 5
    for rec in reqs:
        assert "age" not in rec["inputs"]  # dropped (ages 93/94 as digits could occur inside hashes)
        assert rec["inputs"]["employment"] == ["***"]
        assert rec["inputs"]["purpose"] == ["car"]  # not redacted
        assert rec["inputs"]["income"][0].startswith("hmac:")


def test_equal_incomes_hash_equal_and_different_ones_differ(redacted: Redacted) -> None:
    same_v1, same_v2, other = (income_of(redacted, i) for i in ("same-v1", "same-v2", "other"))
    assert same_v1 == same_v2
    assert same_v1 != other


def test_an_income_sent_as_int_or_float_hashes_equal(redacted: Redacted) -> None:
    assert income_of(redacted, "int") == income_of(redacted, "float")


# ------------------------------------------------------------------------------ SIGTERM and kill -9


def test_sigterm_under_load_loses_no_record(start_server: StartServer, tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    server = start_server(MODELS, POLICIES, env={"GATEWAY_AUDIT_DIR": str(audit)})
    seen = asyncio.run(drive(server, seconds=4.0, callers=8, signal_after=1.0))
    server.process.wait(timeout=20)

    assert len(seen.ok) >= 20
    recorded = [r["request_id"] for r in request_records(audit)]
    assert len(recorded) == len(seen.ok)
    assert sorted(recorded) == sorted(seen.ok)
    verdict = verify(audit)
    assert verdict.ok
    assert verdict.findings == []


def test_kill_9_leaves_a_torn_line_that_a_restart_recovers(start_server: StartServer, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    audit, state = tmp_path / "audit", tmp_path / "state"
    first = start_server(MODELS, POLICIES, env={"GATEWAY_AUDIT_DIR": str(audit)}, state=state)
    seen = asyncio.run(drive(first, seconds=4.0, callers=8, signal_after=0.5, signum=signal.SIGKILL))
    assert first.process.wait(timeout=20) == -signal.SIGKILL
    assert len(seen.ok) >= 20

    files = sorted(audit.glob("audit-*.jsonl"))
    newest = files[-1]
    assert only_torn_at_end(verify(audit), newest)  # whatever the kill left: at most a torn last line
    data = newest.read_bytes()
    torn_line = data.count(b"\n") + 1
    offset = data.rindex(b"\n") + 1 if b"\n" in data else 0
    partial = b'{"fallback_reason":null,"inputs":{"age":[41],"credit_hist'
    with newest.open("ab") as handle:  # the write the kill interrupted
        handle.write(partial)

    verdict = verify(audit)
    assert not verdict.ok
    bad = next(f for f in verdict.findings if f.fatal)
    assert (bad.file, bad.line, bad.seq) == (newest.name, torn_line, None)
    assert "torn" in bad.problem
    code, output = verify_command(audit)
    assert code == 1
    assert f"{newest.name}:{torn_line}:" in output
    kept = list(records(audit))
    assert kept  # records written before the kill are on disk
    last = kept[-1]

    second = start_server(MODELS, POLICIES, env={"GATEWAY_AUDIT_DIR": str(audit)}, state=state)
    answer = httpx.post(f"{second.url}{PREDICT}", json={"instances": [good_row()]},
                        headers={"X-Request-Id": "after-restart"}, timeout=10)
    assert answer.status_code == 200
    second.stop()

    verdict = verify(audit)
    assert verdict.ok, [f.describe() for f in verdict.findings]
    notes = [f for f in verdict.findings if not f.fatal]
    assert [(n.file, n.line) for n in notes] == [(newest.name, torn_line)]
    assert newest.read_bytes().endswith(partial)  # the evidence is left in place
    after = [r for r in records(audit) if r["seq"] > last["seq"]]
    recovery = after[0]
    assert recovery["kind"] == "recovery"
    assert (recovery["file"], recovery["offset"]) == (newest.name, offset)
    assert (recovery["seq"], recovery["prev"]) == (last["seq"] + 1, last["hash"])
    assert [r["kind"] for r in show(capsys, audit, "--request-id", "after-restart")] == ["request"]
    assert verdict.records == len(kept) + len(after)


def test_restarts_without_traffic_keep_the_chain(start_server: StartServer, tmp_path: Path) -> None:
    audit, state = tmp_path / "audit", tmp_path / "state"
    env = {"GATEWAY_AUDIT_DIR": str(audit)}
    for request_id in ("before", None, "after"):
        server = start_server(MODELS, POLICIES, env=env, state=state)
        if request_id is not None:
            answer = httpx.post(f"{server.url}{PREDICT}", json={"instances": [good_row()]},
                                headers={"X-Request-Id": request_id}, timeout=10)
            assert answer.status_code == 200
        server.stop()
    assert [r["request_id"] for r in request_records(audit)] == ["before", "after"]
    verdict = verify(audit)
    assert verdict.findings == [], [f.describe() for f in verdict.findings]


# ---------------------------------------------------------------------- a full queue: reject and drop


@dataclass
class Burst:
    audit: Path
    statuses: list[int] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    metrics: str = ""


def burst_until(on_full: str, base: Path, done: Callable[[Burst, httpx.Client], bool]) -> Burst:
    """A server with GATEWAY_AUDIT_QUEUE=1 (fsync per batch: a slow writer) under bursts of 64 concurrent
    requests, until `done` holds (at most 20 bursts); the server is stopped before this returns."""
    policies = with_audit_policy(base / "policies", {"on_full": on_full})
    result = Burst(base / "audit")
    server = RunningServer(MODELS, policies, env={"GATEWAY_AUDIT_DIR": str(result.audit), "GATEWAY_AUDIT_QUEUE": "1",
                                                  "GATEWAY_AUDIT_FSYNC": "batch"}, state=base / "state")

    async def one_burst(burst: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=10,
                                     limits=httpx.Limits(max_connections=64)) as client:
            answers = await asyncio.gather(*(
                client.post(PREDICT, json={"instances": [good_row()]}, headers={"X-Request-Id": f"b{burst}-{i}"})
                for i in range(64)))
        for answer in answers:
            result.statuses.append(answer.status_code)
            if answer.status_code == 200:
                result.ok.append(answer.json()["id"])
            else:
                result.bodies.append(answer.text)

    try:
        server.wait_live()
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for burst in range(20):
                asyncio.run(one_burst(burst))
                if done(result, http):
                    break
            result.metrics = http.get("/metrics").text
    finally:
        server.stop()
    return result


def test_reject_answers_503_and_never_answers_unrecorded(tmp_path: Path) -> None:
    burst = burst_until("reject", tmp_path, lambda b, _: 503 in b.statuses)
    assert 503 in burst.statuses
    assert set(burst.statuses) == {200, 503}
    assert all("audit" in body and "on_full: reject" in body for body in burst.bodies)
    assert metric(burst.metrics, "gateway_audit_records_total", outcome="rejected") == burst.statuses.count(503)
    recorded = [r["request_id"] for r in request_records(burst.audit)]
    assert sorted(recorded) == sorted(burst.ok)  # every 200 has its record; no refused request has one
    assert verify(burst.audit).ok


def _written_behind(burst: Burst, http: httpx.Client) -> bool:
    """True once the queue has drained and fewer records were written than requests answered."""
    def drained() -> bool:
        return metric(http.get("/metrics").text, "gateway_audit_backlog") == 0

    wait_until(drained, timeout=10)
    return metric(http.get("/metrics").text, "gateway_audit_records_total", outcome="written") < len(burst.ok)


@pytest.fixture(scope="module")
def dropping(tmp_path_factory: pytest.TempPathFactory) -> Burst:
    return burst_until("drop", tmp_path_factory.mktemp("drop"), _written_behind)


def test_drop_answers_everything_and_records_fewer(dropping: Burst) -> None:
    assert set(dropping.statuses) == {200}
    recorded = [r["request_id"] for r in request_records(dropping.audit)]
    assert 0 < len(recorded) < len(dropping.ok)
    assert set(recorded) <= set(dropping.ok)
    assert len(set(recorded)) == len(recorded)
    assert verify(dropping.audit).ok


def test_drop_is_counted_in_metrics(dropping: Burst) -> None:
    assert len(request_records(dropping.audit)) < len(dropping.ok)  # records were dropped
    assert metric(dropping.metrics, "gateway_audit_records_total", outcome="dropped") > 0
