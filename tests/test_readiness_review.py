"""Review of the readiness checklist and its promotion gate (issue 8): defects found, each pinned by a test.

Each test here was written as a strict xfail documenting a defect a review found, and lost its
marker when the defect was fixed: they now guard against the defects coming back. Checks are called one
at a time through a real `Context` where possible (no staging gateway); the few that need a real
server say so.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from gateway.readiness import checklist, checks_model, checks_serving, jobs
from gateway.readiness import context as context_module
from gateway.readiness.command import EXIT_CANNOT_RUN, run_command
from gateway.readiness.context import CannotRun, Context, Target
from gateway.readiness.data import GoldenLine
from gateway.readiness.report import ItemResult, ReadinessReport
from gateway.readiness.staging import StagingError
from gateway.readiness.store import ReportRejected, ReportStore
from tests.conftest import MODEL, ROOT, patch_policy


def _context(repo: tuple[Path, Path], version: str = "2") -> Context:
    return Context(Target(MODEL, version, repo[0], repo[1]))


def _args(repo: tuple[Path, Path], out: Path, version: str = "2") -> argparse.Namespace:
    return argparse.Namespace(model=MODEL, version=version, models=repo[0], policies=repo[1], out=out, store=None,
                              no_store=True, submit=None, token=None, production_url=None, scale=0.1, quiet=True)


class _StagingThatWillNotStart:
    """Stands in for StagingGateway: the port is taken, the binary is broken, ... (start raises)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.url = "http://127.0.0.1:9"

    def start(self) -> None:
        raise StagingError("the staging gateway exited with code 1: address already in use")

    def stop(self) -> None:
        pass


# ================================================================ the gate


def test_a_hand_made_report_that_is_not_the_checklist_does_not_open_the_gate(tmp_path: Path) -> None:
    sha_model, sha_policy = "a" * 64, "b" * 64
    forged = ReadinessReport(MODEL, "2", sha_model, sha_policy,
                             [ItemResult("governance", "trust_me", "Trust me", "pass")]).as_json()
    store = ReportStore(tmp_path)
    with pytest.raises(ReportRejected):
        store.put(forged)
    assert store.passing(MODEL, "2", sha_model, sha_policy) is None


# ================================================================ admin-API runs (jobs.py)


def test_two_runs_started_together_are_not_both_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_exec = asyncio.create_subprocess_exec

    async def spawn(*command: str, **kwargs: Any) -> Any:  # a real child, after a realistic spawn delay
        await asyncio.sleep(0.02)
        return await real_exec("/bin/sh", "-c", "exit 1", **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)

    async def main() -> list[Any]:
        runner = jobs.ReadinessRunner(tmp_path, tmp_path, tmp_path / "store", lambda actor, report: None)
        results = await asyncio.gather(runner.start(MODEL, "2", "a"), runner.start(MODEL, "2", "b"),
                                       return_exceptions=True)
        await asyncio.gather(*runner._tasks, return_exceptions=True)
        return list(results)

    results = asyncio.run(main())
    assert sum(isinstance(r, jobs.RunRefused) for r in results) == 1, results


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(p) for p in handle.read().split()]
    return found


def _state_dir_of(pid: int) -> Path | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"GATEWAY_STATE_DIR="):
            return Path(entry.split(b"=", 1)[1].decode())
    return None


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_terminating_the_cli_stops_its_staging_gateway(repo: tuple[Path, Path], tmp_path: Path) -> None:
    cli = subprocess.Popen(
        [sys.executable, "-m", "gateway", "readiness", MODEL, "2", "--models", str(repo[0]), "--policies",
         str(repo[1]), "--out", str(tmp_path / "out"), "--no-store", "--scale", "0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    staging: list[int] = []
    try:
        assert cli.stderr is not None
        for line in cli.stderr:  # edge_inputs (item 5) has started the staging gateway, which stays up
            if line.startswith("[ 5]"):
                break
        staging = _children(cli.pid)
        assert staging, "the staging gateway should be running by now"
        cli.send_signal(signal.SIGTERM)  # what ReadinessRunner does on timeout and at shutdown
        cli.wait(timeout=30)
        deadline = time.monotonic() + 8  # an idle gateway stops within a second or two of SIGTERM
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in staging):
            time.sleep(0.2)
        leftover = [p for p in staging if Path(f"/proc/{p}").exists()]
        assert leftover == [], f"staging gateway(s) {leftover} outlived the readiness CLI"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if cli.stderr is not None:
            cli.stderr.close()
        for pid in staging:  # only the processes this test started
            workdir = _state_dir_of(pid)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
            if workdir is not None and workdir.parent.name.startswith("gateway-readiness-"):
                shutil.rmtree(workdir.parent, ignore_errors=True)


# ================================================================ exit codes and crashes of the CLI / run()


def test_a_staging_gateway_that_will_not_start_exits_2(repo: tuple[Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context_module, "StagingGateway", _StagingThatWillNotStart)
    err, out = io.StringIO(), io.StringIO()
    code = run_command(_args(repo, tmp_path / "out"), err=err, out=out)
    assert code == EXIT_CANNOT_RUN, (code, out.getvalue())


def test_alert_rules_of_the_wrong_shape_do_not_crash_the_run(repo: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "alerts.yml"
    rules.write_text("- alert: GatewayDown\n  expr: up == 0\n")  # a list, not {groups: [...]}
    patch_policy(repo[1], MODEL, readiness={"alert_rules": str(rules)})
    monkeypatch.setattr(checklist, "phases", lambda ctx: [])  # only the code around the phases is under test
    report = checklist.run(Target(MODEL, "2", repo[0], repo[1]))
    assert report.maturity["level"] < 3  # no usable alert rules: not "monitored"


def test_a_production_status_that_is_not_an_object_cannot_run(repo: tuple[Path, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    class Answer:
        status_code = 200

        def raise_for_status(self) -> None:
            pass

        def json(self) -> Any:
            return ["not", "a", "status"]

    monkeypatch.setattr(httpx, "get", lambda *a, **k: Answer())  # the one context.py calls
    monkeypatch.setattr(checklist, "phases", lambda ctx: [])
    with pytest.raises(CannotRun, match="production"):
        checklist.run(Target(MODEL, "2", repo[0], repo[1], production_url="http://prod.example"))


# ================================================================ the content address


def _fake_run(p99: float, server_ms: float = 0.4, rss: list[tuple[float, int]] | None = None) -> dict[str, Any]:
    summary = {"latency_ms": {"p50": p99 / 3, "p90": p99 / 2, "p99": p99, "p99.9": p99, "max": p99},
               "error_rate": 0.0, "achieved_rps": 400.0, "scheduled_rps": 400.0, "requests": 800, "non_2xx": 0,
               "errors_by_status": {}, "transport_errors": {}, "versions": {"1": 500, "2": 300},
               "fallback_reasons": {}}
    actions = [{"action": "switch", "status": 200, "round_trip_ms": server_ms + 1, "server_ms": server_ms,
                "error": None},
               {"action": "rollback", "status": 200, "round_trip_ms": server_ms + 1, "server_ms": server_ms,
                "error": None}]
    return {"summary": summary, "latencies": [p99] * 10, "rss": rss or [], "actions": actions, "steal": 0.0}


def _addressed(result: ItemResult) -> dict[str, Any]:
    """What of an item the report's address covers (report.py: everything but `seconds` and `measured`)."""
    addressed: dict[str, Any] = ReadinessReport(MODEL, "2", "a" * 64, "b" * 64, [result]).content()["items"][0]
    return addressed


@pytest.mark.parametrize("check, first, second", [
    ("load_test", _fake_run(7.1), _fake_run(9.8)),
    ("soak", _fake_run(5, rss=[(float(t), 100 << 20) for t in range(9)]),
     _fake_run(5, rss=[(float(t), (100 << 20) + (t > 5) * (1 << 20)) for t in range(9)])),
    ("rehearsal", _fake_run(5, server_ms=0.41), _fake_run(5, server_ms=0.57)),
])
def test_measurements_that_do_not_change_the_verdict_do_not_change_the_address(
        repo: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, check: str, first: dict[str, Any],
        second: dict[str, Any]) -> None:
    ctx = _context(repo)
    results = []
    try:
        for run in (first, second):
            monkeypatch.setattr(checks_serving, "_load", lambda *args, run=run, **kwargs: run)
            results.append(getattr(checks_serving, check)(ctx))
    finally:
        ctx.close()  # the rehearsal reads the staging gateway's aliases before its load
    assert results[0].status == results[1].status == "pass"
    assert _addressed(results[0]) == _addressed(results[1])


# ================================================================ checks on unusual but valid inputs


def test_fallback_reasons_runs_for_a_policy_with_an_empty_readiness_section(
        repo: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    patch_policy(repo[1], MODEL, readiness=None)
    ctx = _context(repo)
    assert ctx.policy.readiness is None  # valid: no gate, checklist defaults
    monkeypatch.setattr(checks_serving, "StagingGateway", _StagingThatWillNotStart)
    result = checks_serving.fallback_reasons(ctx)  # with the defect: TypeError
    assert result.status == "fail" and "did not start" in result.detail


def test_golden_examples_with_a_string_label_output_are_compared_as_strings(
        repo: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _context(repo)
    model = ctx.require_model().model
    assert model is not None
    real_run = model.run
    names = {0: "repaid", 1: "default"}

    def run(feeds: Any) -> dict[str, Any]:  # the same model, with its label output as text (as a string classifier)
        outputs = dict(real_run(feeds))
        outputs["label"] = np.array([names[int(v)] for v in np.ravel(outputs["label"])], dtype=object)
        return outputs

    monkeypatch.setattr(model, "run", run)
    lines = [GoldenLine(g.version, g.example.model_copy(update={"outputs": {
        **g.example.outputs, "label": names[int(g.example.outputs["label"])]}}) if g.version == "2" else g.example)
        for g in ctx.golden]
    ctx.__dict__["golden"] = lines  # the cached golden.jsonl, as a string-label model's would read
    card = ctx.require_card()
    card = card.model_copy(update={"golden": [
        e.model_copy(update={"outputs": {**e.outputs, "label": names[int(e.outputs["label"])]}}) for e in card.golden]})
    monkeypatch.setattr(Context, "card", property(lambda self: card))
    result = checks_model.golden(ctx)
    assert result.status == "pass", result.detail


def test_beats_baselines_does_not_pass_when_the_stable_could_not_be_compared(repo: tuple[Path, Path]) -> None:
    card_path = repo[0] / MODEL / "1" / "model.yaml"
    card = yaml.safe_load(card_path.read_text())
    card.pop("score")
    card_path.write_text(yaml.safe_dump(card, sort_keys=False))
    ctx = _context(repo)
    assert ctx.stable() is not None  # v1 loads and serves: it is the stable to beat
    result = checks_model.beats_baselines(ctx)
    assert result.status != "pass" or "stable v1" in result.evidence, (result.status, result.detail, result.evidence)


def test_the_golden_detail_does_not_deny_a_regression_it_allowed(repo: tuple[Path, Path]) -> None:
    result = checks_model.golden(_context(repo))
    assert result.status == "pass" and result.evidence["regressed"] == ["golden-09-C1010295"]
    assert "no regression" not in result.detail, result.detail


@pytest.mark.parametrize("routing", [
    pytest.param({"stable": "1", "shadow": {"version": "2", "percent": 100}}, id="candidate-shadowed-before-release"),
    pytest.param({"stable": "1", "canary": {"version": "2", "percent": 5}}, id="candidate-as-policy-canary"),
    pytest.param({"stable": None}, id="no-declared-stable-highest-version-serves"),
])
@pytest.mark.e2e
def test_health_passes_when_the_policy_routes_to_the_candidate(repo: tuple[Path, Path],
                                                               routing: dict[str, Any]) -> None:
    patch_policy(repo[1], MODEL, routing=routing)
    ctx = _context(repo)
    try:
        result = checks_serving.health(ctx)
    finally:
        ctx.close()
    assert result.status == "pass", result.detail


# ================================================================ the gate through a real server


@pytest.fixture
def gated(repo_copy: tuple[Path, Path], start_server: Any, tmp_path: Path) -> Any:
    from tests.test_readiness_gate import ENV, Gated

    server = Gated(start_server(*repo_copy, env=ENV, state=tmp_path / "state"))
    yield server, repo_copy
    server.close()


@pytest.mark.e2e
def test_a_full_canary_of_an_unreported_version_is_gated(gated: Any) -> None:
    from tests.conftest import good_row
    from tests.test_readiness_gate import VIEW

    server, _ = gated
    server.call("POST", f"{VIEW}/switch", {"version": "2"}, status=409)  # the gate is enforced ...
    server.call("PUT", f"{VIEW}/canary", {"version": "2", "percent": 100}, status=409)  # ... so is this
    answer = server.http.post(f"/v1/models/{MODEL}:predict", json={"instances": [good_row()]})
    assert answer.headers["x-model-version"] == "1"


@pytest.mark.e2e
def test_going_back_to_a_previous_stable_whose_file_changed_is_gated(gated: Any) -> None:
    from tests.test_readiness_gate import ADMIN, VIEW, report

    server, (models, _) = gated
    shas, policy_sha = server.shas()
    server.call("PUT", "/admin/readiness", report(shas["2"], policy_sha), status=201)
    assert server.call("POST", f"{VIEW}/switch", {"version": "2"})["gate"]["forced"] is False
    server.call("POST", f"{VIEW}/rollback", {"reason": "try again later"})
    # version 2 is rebuilt in place (here: version 1's model under version 2's name) and loaded
    for name in ("model.onnx", "model.yaml"):
        shutil.copy(models / MODEL / "1" / name, models / MODEL / "2" / name)
    card = yaml.safe_load((models / MODEL / "2" / "model.yaml").read_text())
    card["version"] = "2"
    (models / MODEL / "2" / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    server.call("POST", f"/v2/repository/models/{MODEL}/load?version=2", token=ADMIN)
    assert server.shas()[0]["2"] != shas["2"]
    error = server.call("POST", f"{VIEW}/switch", {"version": "2"}, status=409)["error"]
    assert "no passing readiness report" in error


@pytest.mark.e2e
def test_the_rehearsal_of_the_policy_stable_while_production_runs_another(repo: tuple[Path, Path]) -> None:
    ctx = Context(Target(MODEL, "1", repo[0], repo[1], production_url="http://127.0.0.1:9", scale=0.1))
    ctx.production_status = {"server": {}, "models": [{"name": MODEL, "aliases": {"stable": "2"}, "versions": []}]}
    assert ctx.stable_version == "2"
    try:
        result = checks_serving.rehearsal(ctx)
    finally:
        ctx.close()
    assert result.status == "pass", result.detail


def test_a_change_answer_lifts_its_extra_facts_without_repeating_them() -> None:
    from gateway.control import Change

    answer = Change(MODEL, "switch", {}, {}, 1.0, {"gate": {"readiness_report": None, "forced": True}}).as_dict()
    assert "extra" not in answer and answer["gate"] == {"readiness_report": None, "forced": True}


@pytest.mark.e2e
def test_a_staging_gateway_that_exits_at_start_leaves_no_directory(repo: tuple[Path, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]

    ctx = _context(repo)
    monkeypatch.setenv("GATEWAY_INFERENCE_THREADS", "0")  # the server refuses its settings and exits at once
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)  # the one staging.py calls
    try:
        with pytest.raises(CannotRun, match="exited with code"):
            ctx.staging()
        ctx.close()  # what checklist.run does whatever happened
        assert made and [d for d in made if Path(d).exists()] == []
    finally:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)


def test_a_binned_protected_column_with_a_missing_marker_is_reported_or_counted_missing(
        repo: tuple[Path, Path]) -> None:
    from gateway.readiness.data import DataError

    path = repo[0] / MODEL / "data" / "heldout.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    age = header.index("age")
    lines[0] += ",applicant_age"  # a protected column next to the features, not one of them
    for i in range(1, len(lines)):
        lines[i] += "," + ("NA" if i == 4 else lines[i].split(",")[age])
    path.write_text("\n".join(lines) + "\n")
    patch_policy(repo[1], MODEL, readiness={"fairness": {"groups": [{"column": "applicant_age", "bins": [30, 60]}],
                                                  "decision_threshold": 0.2, "favourable": "negative"}})
    try:
        result = checks_model.fairness(_context(repo))
    except DataError as exc:
        assert "applicant_age" in str(exc) and "heldout.csv" in str(exc)
    else:
        assert result.status in ("pass", "fail") and "applicant_age" in result.evidence["groups"]


def test_golden_regressions_are_judged_for_a_candidate_with_a_new_input(repo: tuple[Path, Path]) -> None:
    import hashlib

    onnx = pytest.importorskip("onnx")
    models, policies = repo
    version_dir = models / MODEL / "2"
    graph = onnx.load(str(version_dir / "model.onnx"))  # v2 plus one (unused) input: v1 does not have it
    graph.graph.input.append(onnx.helper.make_tensor_value_info("bureau_score", onnx.TensorProto.FLOAT, [None, 1]))
    data = graph.SerializeToString()
    (version_dir / "model.onnx").write_bytes(data)
    card = yaml.safe_load((version_dir / "model.yaml").read_text())
    card["sha256"] = hashlib.sha256(data).hexdigest()
    card["signature"]["inputs"].append({"name": "bureau_score", "datatype": "FP32", "shape": [-1, 1]})
    for example in card["golden"]:
        example["inputs"]["bureau_score"] = 0.0
    (version_dir / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    document = yaml.safe_load((policies / f"{MODEL}.yaml").read_text())
    document["schema"]["features"]["bureau_score"] = {"type": "float", "required": False, "default": 0.0}
    (policies / f"{MODEL}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    ctx = _context(repo)
    assert ctx.candidate.ready and ctx.stable() is not None
    assert checks_model.beats_baselines(ctx).status == "pass"  # the stable is scored fine on its own signature
    result = checks_model.golden(ctx)  # with the defect: InferenceFailed from v1's session
    assert result.status == "pass" and result.evidence["stable_version"] == "1", result.detail


def test_a_production_policy_that_differs_fails_the_environment_item(repo: tuple[Path, Path]) -> None:
    from gateway.readiness import checks_ops
    from gateway.readiness.fingerprint import environment

    ctx = Context(Target(MODEL, "2", repo[0], repo[1], production_url="http://127.0.0.1:9"))
    ctx.production_status = {"server": {"environment": environment()},
                             "models": [{"name": MODEL, "aliases": {"stable": "1"}, "policy": {"sha256": "0" * 64},
                                         "versions": [{"version": "2", "sha256": ctx.model_sha256}]}]}
    result = checks_ops.environment(ctx)
    assert result.evidence["production_policy_sha256"] != result.evidence["this_policy_sha256"]
    assert result.status == "fail", result.detail


@pytest.fixture
def repo(readiness_repo: tuple[Path, Path]) -> tuple[Path, Path]:
    """The readiness copy of the repository (tests/conftest.py)."""
    return readiness_repo


def test_an_unreadable_report_ends_an_admin_run_as_could_not_run_and_leaves_no_directory(tmp_path: Path) -> None:
    from gateway.readiness.jobs import ReadinessJob, ReadinessRunner

    class FinishedProcess:  # a child that exited 0 after writing a broken report (an injected fault)
        class stdout:  # noqa: N801
            @staticmethod
            async def read(_: int) -> bytes:
                return b""

        @staticmethod
        async def wait() -> int:
            return 0

    out = tmp_path / "out"
    out.mkdir()
    (out / "m-1-readiness.json").write_text("{not json")
    runner = ReadinessRunner(tmp_path, tmp_path, tmp_path / "store", on_report=lambda actor, report: None)
    job = ReadinessJob(1, "m", "1", "ops", 1.0, 0.0)
    job._process = FinishedProcess()
    asyncio.run(runner._watch(job, out))
    assert job.status == "could_not_run" and "could not be read" in job.output
    assert not out.exists()
