"""The readiness gate (issue 8): promotion to stable needs a passing report for that model file and policy.

The report store on its own (verification, pruning, junk), then the gate through real servers over
a copy of the repository whose policy enforces it, as shipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.admin_client import AdminClient
from gateway.audit import records, verify
from gateway.readiness.items import CHECKLIST
from gateway.readiness.report import ItemResult, ReadinessReport
from gateway.readiness.store import ReportRejected, ReportStore
from gateway.state import StateStore
from tests.conftest import MODEL, RunningServer, good_row, make_client, patch_policy

StartServer = Callable[..., RunningServer]

VIEWER = "gate-viewer-token-0123456789"
OPERATOR = "gate-operator-token-0123456789"
ADMIN = "gate-admin-token-0123456789"
ENV = {"GATEWAY_ADMIN_TOKENS": json.dumps([
    {"name": "vera", "role": "viewer", "token": VIEWER},
    {"name": "otto", "role": "operator", "token": OPERATOR},
    {"name": "ada", "role": "admin", "token": ADMIN},
])}
VIEW = f"/admin/models/{MODEL}"
SHA_A, SHA_B = "a" * 64, "b" * 64


def report(model_sha: str = SHA_A, policy_sha: str = SHA_B, version: str = "2", ready: bool = True,
           model: str = MODEL, finished: Any = None, tag: str = "") -> dict[str, Any]:
    """A report's JSON form, made by the real classes: every item passes, or one fails when not `ready`."""
    items = [ItemResult(phase, key, title, "pass", "fine", {"value": 1}, measured={"ms": 3.5}, seconds=0.25)
             for phase, key, title in CHECKLIST[:-1]]
    phase, key, title = CHECKLIST[-1]
    items.append(ItemResult(phase, key, title, "pass" if ready else "fail", "matches" if ready else "differs"))
    timings = {"started": 1_700_000_000.0} | ({"finished": finished} if finished is not None else {})
    made = ReadinessReport(model, version, model_sha, policy_sha, items, context={"tag": tag}, timings=timings)
    assert made.ready is ready
    return made.as_json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------- the store


def test_a_stored_report_is_summarised_and_opens_only_its_own_model_file_and_policy(tmp_path: Path) -> None:
    store = ReportStore(tmp_path)
    made = report(finished=1_700_000_100.0)
    summary = store.put(made)
    assert summary == {"sha256": made["sha256"], "model": MODEL, "version": "2", "ready": True, "score": 1.0,
                       "band": "ready", "model_sha256": SHA_A, "policy_sha256": SHA_B, "created": 1_700_000_100.0}
    assert json.loads((tmp_path / MODEL / f"{made['sha256']}.json").read_text()) == made
    assert store.summaries(MODEL) == [summary]
    assert store.passing(MODEL, "2", SHA_A, SHA_B) == summary
    assert store.passing(MODEL, "2", SHA_A, "c" * 64) is None  # another policy
    assert store.passing(MODEL, "2", "c" * 64, SHA_B) is None  # another model file
    assert store.passing(MODEL, "3", SHA_A, SHA_B) is None  # another version
    assert store.passing("other-model", "2", SHA_A, SHA_B) is None
    assert store.put(made) == summary and len(list((tmp_path / MODEL).iterdir())) == 1  # same address, one file


def test_a_report_that_is_not_ready_never_opens_the_gate(tmp_path: Path) -> None:
    store = ReportStore(tmp_path)
    summary = store.put(report(ready=False))
    assert (summary["ready"], summary["band"]) == (False, "ready")  # 21 of 22 is the top band, but a fail is a fail
    assert store.passing(MODEL, "2", SHA_A, SHA_B) is None
    assert store.summaries(MODEL) == [summary]


def test_a_report_changed_after_it_was_made_is_rejected_with_the_reason(tmp_path: Path) -> None:
    store = ReportStore(tmp_path)
    changed = report(ready=False)
    changed["items"][-1]["status"] = "pass"  # the failed item, turned into a pass by hand
    with pytest.raises(ReportRejected, match="content address mismatch: the report was changed after it was made"):
        store.put(changed)
    retargeted = report()
    retargeted["policy_sha256"] = "c" * 64  # the report of one policy passed off for another
    with pytest.raises(ReportRejected, match="content address mismatch"):
        store.put(retargeted)
    assert not tmp_path.exists() or store.summaries(MODEL) == []


def test_timings_and_measurements_may_differ_without_breaking_the_address(tmp_path: Path) -> None:
    made = report()
    made["timings"]["finished"] = "2026-01-02T03:04:05+00:00"
    made["measured"] = {"infrastructure.check_infrastructure": {"ms": 99}}
    made["items"][0]["seconds"] = 7.0
    assert ReportStore(tmp_path).put(made)["created"] == 1767323045.0


def test_a_verdict_that_does_not_follow_from_the_items_is_rejected(tmp_path: Path) -> None:
    from gateway.readiness.report import address_of

    forged = report(ready=False)
    forged["ready"], forged["band"], forged["score"] = True, "ready", 1.0
    forged["sha256"] = address_of(forged)  # addressed afresh: the address alone cannot catch this
    with pytest.raises(ReportRejected) as caught:
        ReportStore(tmp_path).put(forged)
    message = caught.value.message
    assert "inconsistent verdict: ready is true but the items give false" in message
    assert "score 1.0 but the items give 0.954545" in message


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda r: r.pop("sha256"), "sha256: 64 lower-case hex digits"),
    (lambda r: r.update(model="../etc"), "model: a name"),
    (lambda r: r.update(version=2), "version: a name"),
    (lambda r: r.update(model_sha256="ABC"), "model_sha256: 64 lower-case hex digits"),
    (lambda r: r.update(score=True), "score: a number in [0, 1]"),
    (lambda r: r.update(score=1.5), "score: a number in [0, 1]"),
    (lambda r: r.update(band="great"), "band: one of"),
    (lambda r: r.update(ready="yes"), "ready: true or false"),
    (lambda r: r.update(context=[]), "context: an object"),
    (lambda r: r.update(timings="today"), "timings: an object"),
    (lambda r: r.update(items=[]), "items: a non-empty list"),
    (lambda r: r["items"].append("pass"), "items[22]: an object"),
    (lambda r: r["items"][0].update(status="fine"), "items[0].status: one of pass"),
    (lambda r: r["items"][1].pop("title"), "items[1]: title must be strings"),
    (lambda r: r.update(figures=[{"x": 2**70}]), "it cannot be written as JSON"),  # outside the address
])
def test_malformed_reports_are_rejected_naming_the_field(tmp_path: Path, mutate: Callable[[dict[str, Any]], Any],
                                                         reason: str) -> None:
    made = report()
    mutate(made)
    with pytest.raises(ReportRejected, match="readiness report rejected") as caught:
        ReportStore(tmp_path).put(made)
    assert reason in caught.value.message
    assert not (tmp_path / MODEL).exists() or not list((tmp_path / MODEL).glob("*.json"))


def test_not_an_object_is_rejected(tmp_path: Path) -> None:
    for junk in ([], "report", None, 3):
        with pytest.raises(ReportRejected, match="a report is a JSON object"):
            ReportStore(tmp_path).put(junk)


def test_a_file_changed_on_disk_is_ignored_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ReportStore(tmp_path)
    made = report()
    store.put(made)
    assert store.passing(MODEL, "2", SHA_A, SHA_B) is not None
    path = tmp_path / MODEL / f"{made['sha256']}.json"
    stored = json.loads(path.read_text())
    stored["items"][0]["evidence"] = {"value": 2}  # edited on disk
    path.write_text(json.dumps(stored))
    with caplog.at_level(logging.ERROR, logger="gateway.readiness.store"):
        assert store.passing(MODEL, "2", SHA_A, SHA_B) is None
        assert store.summaries(MODEL) == []
    assert "content address mismatch" in caplog.text and str(path) in caplog.text
    # a good report copied under another address is not trusted either
    other = report(tag="other")
    (tmp_path / MODEL / f"{'d' * 64}.json").write_text(json.dumps(other))
    assert store.summaries(MODEL) == [] and "stored under another address" in caplog.text


def test_junk_in_the_directory_is_skipped(tmp_path: Path) -> None:
    store = ReportStore(tmp_path)
    made = report()
    summary = store.put(made)
    folder = tmp_path / MODEL
    (folder / f"{'0' * 64}.json").write_bytes(b"\xff\xfe not json")
    (folder / f"{'1' * 64}.json").write_text("[1, 2, 3]")
    (folder / f"{'2' * 64}.json").write_text("")
    (folder / f"{'3' * 64}.json").mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "short.json").write_text(json.dumps(made))
    (folder / f".{made['sha256']}.json.tmp").write_text("half a wri")
    (tmp_path / "stray-file").write_text("x")
    (tmp_path / "not a model name").mkdir()
    assert store.summaries(MODEL) == [summary]
    assert store.passing(MODEL, "2", SHA_A, SHA_B) == summary
    assert store.summaries("not a model name") == [] and store.summaries("../..") == []
    assert store.summaries("stray-file") == [] and ReportStore(tmp_path / "absent").summaries(MODEL) == []


def test_each_model_keeps_its_most_recently_stored_reports(tmp_path: Path) -> None:
    store = ReportStore(tmp_path, keep_per_model=3)
    start = time.time() - 1000
    stored = []
    for i in range(5):
        made = report(tag=str(i), finished=start + i)
        store.put(made)
        path = tmp_path / MODEL / f"{made['sha256']}.json"
        os.utime(path, (start + i, start + i))  # stored one second apart
        stored.append(made["sha256"])
    store.put(report(model="other-model", tag="x"))
    left = sorted(p.stem for p in (tmp_path / MODEL).glob("*.json"))
    assert len(left) == 3 and set(left) <= set(stored)
    assert stored[-1] in left and stored[0] not in left  # the newest is never the one pruned
    assert [s["sha256"] for s in store.summaries(MODEL)] == [s for s in reversed(stored) if s in left]
    assert len(store.summaries("other-model")) == 1


def test_summaries_are_newest_first_by_when_the_report_was_made(tmp_path: Path) -> None:
    store = ReportStore(tmp_path)
    old = store.put(report(tag="old", finished=1_600_000_000))
    new = store.put(report(tag="new", finished="2030-01-01T00:00:00"))
    unknown = store.put(report(tag="unknown", finished="not a time"))  # falls back to when it was stored
    assert [s["sha256"] for s in store.summaries(MODEL)] == [new["sha256"], unknown["sha256"], old["sha256"]]
    assert new["created"] == 1893456000.0 and abs(unknown["created"] - time.time()) < 60


def test_rollout_state_files_from_before_the_gate_still_load(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    (tmp_path / f"{MODEL}.state.json").write_text(json.dumps({
        "aliases": {"stable": "1", "canary": "2", "canary_percent": 10.0}, "routing_hash": "0123456789abcdef",
        "rollout": {"version": "2", "steps": [10, 100], "step": 0, "status": "running", "actor": "bot",
                    "history": []}, "updated_at": 1.0}))
    loaded = store.load(MODEL)
    assert loaded is not None and loaded.rollout is not None
    assert (loaded.rollout.forced, loaded.rollout.report_sha256) == (False, "")
    from dataclasses import replace
    store.save(MODEL, replace(loaded, rollout=replace(loaded.rollout, forced=True, report_sha256=SHA_A)))
    again = store.load(MODEL)
    assert again is not None and again.rollout is not None
    assert (again.rollout.forced, again.rollout.report_sha256) == (True, SHA_A)


# ---------------------------------------------------------------- through the server


class Gated:
    """A real server over a repository copy whose policy enforces the gate (as shipped)."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=10)

    @property
    def audit(self) -> Path:
        return self.server.state.parent / f"{self.server.state.name}-audit"

    def call(self, method: str, path: str, body: Any = None, token: str = OPERATOR, status: int = 200) -> Any:
        answer = self.http.request(method, path, json=body, headers=bearer(token))
        assert answer.status_code == status, answer.text
        return answer.json()

    def shas(self) -> tuple[dict[str, str], str]:
        """(model file sha256 by version, policy sha256) as the server reports them in /status."""
        described = next(m for m in self.http.get("/status").json()["models"] if m["name"] == MODEL)
        return {v["version"]: v["sha256"] for v in described["versions"]}, described["policy"]["sha256"]

    def aliases(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", VIEW, token=VIEWER)["aliases"]
        return result

    def events(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("GET", "/admin/events", token=VIEWER)["events"]
        return result

    def rollout(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"{VIEW}/rollout", token=VIEWER)["rollout"]
        return result

    def traffic_until(self, done: Callable[[], bool], timeout: float = 20.0) -> None:
        """Unversioned requests (varied rows) until `done()`."""
        deadline = time.monotonic() + timeout
        i = 0
        while not done():
            assert time.monotonic() < deadline, f"not reached in time: {self.rollout()}"
            row = {**good_row(), "debt_to_income": (i % 40) / 100, "income": 40_000.0 + i}
            assert self.http.post(f"/v1/models/{MODEL}:predict", json={"instances": [row]}).status_code == 200
            i += 1

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def gated(repo_copy: tuple[Path, Path], start_server: StartServer, tmp_path: Path) -> Any:
    models, policies = repo_copy
    made = Gated(start_server(models, policies, env=ENV, state=tmp_path / "state"))
    yield made
    made.close()


def _rollout_plan(policies: Path, interval_s: float = 0.5) -> None:
    patch_policy(policies, MODEL, rollout={"steps": [100], "interval_s": interval_s, "min_requests": 5,
                                           "rollback_if": {"drift_alert": False, "p99_ratio_gt": None}})


@pytest.mark.e2e
def test_an_unreported_switch_is_refused_and_only_an_admin_can_force_it_audited(gated: Gated) -> None:
    model_shas, policy_sha = gated.shas()
    assert gated.call("GET", f"{VIEW}/readiness", token=VIEWER) == {
        "model": MODEL, "gate": "enforce", "policy_sha256": policy_sha, "reports": [],
        "versions": {v: {"model_sha256": model_shas[v], "passing": None} for v in ("1", "2")}}

    error = gated.call("POST", f"{VIEW}/switch", {"version": "2"}, status=409)["error"]
    assert f"no passing readiness report for {MODEL} version 2" in error
    assert f"model file {model_shas['2'][:12]} and policy {policy_sha[:12]}" in error
    assert f"gateway readiness {MODEL} 2" in error and "PUT /admin/readiness" in error and "force" in error
    assert gated.aliases()["stable"] == "1"

    forbidden = gated.call("POST", f"{VIEW}/switch", {"version": "2", "force": True}, status=403)["error"]
    assert "force" in forbidden and "needs the admin role" in forbidden and "otto is a operator" in forbidden
    for wrong in ("true", 1, None, [True]):
        gated.call("POST", f"{VIEW}/switch", {"version": "2", "force": wrong}, token=ADMIN, status=400)
    assert gated.aliases()["stable"] == "1"

    change = gated.call("POST", f"{VIEW}/switch", {"version": "2", "force": True}, token=ADMIN)
    assert change["after"]["stable"] == "2" and change["gate"] == {"readiness_report": None, "forced": True}
    assert gated.http.post(f"/v1/models/{MODEL}:predict", json={"instances": [good_row()]}).headers[
        "x-model-version"] == "2"

    # going back to the version just replaced is a rollback: never gated, whichever way it is asked for
    assert gated.call("POST", f"{VIEW}/rollback", {"reason": "second thoughts"})["after"]["stable"] == "1"
    assert gated.call("POST", f"{VIEW}/switch", {"version": "2"})["after"]["stable"] == "2"
    assert "gate" not in gated.call("POST", f"{VIEW}/switch", {"version": "1"})

    actions = [(e["action"], e["actor"]) for e in gated.events()]
    assert actions == [("gate_refused", "otto"), ("gate_forced", "ada"), ("switch", "ada"), ("rollback", "otto"),
                       ("switch", "otto"), ("switch", "otto")]
    forced = gated.events()[1]
    assert forced["after"] == {"version": "2", "for": "switch", "model_sha256": model_shas["2"],
                               "policy_sha256": policy_sha}
    assert "no passing readiness report" in forced["reason"]
    assert gated.events()[2]["gate"] == {"readiness_report": None, "forced": True}

    gated.server.stop()  # drains the audit queue
    control = [r for r in records(gated.audit) if r["kind"] == "control"]
    (audited,) = [r for r in control if r["action"] == "gate_forced"]
    assert audited["actor"] == "ada" and audited["model"] == MODEL and "no passing readiness report" in audited[
        "reason"]
    assert [r["actor"] for r in control if r["action"] == "gate_refused"] == ["otto"]
    assert verify(gated.audit).ok


@pytest.mark.e2e
def test_only_a_passing_report_for_that_model_file_and_policy_opens_the_gate(gated: Gated) -> None:
    model_shas, policy_sha = gated.shas()

    def switch_refused() -> str:
        error: str = gated.call("POST", f"{VIEW}/switch", {"version": "2"}, status=409)["error"]
        return error

    for_other_file = report(model_shas["1"], policy_sha)  # version 2's name on version 1's file
    assert gated.call("PUT", "/admin/readiness", for_other_file, status=201)["ready"] is True
    assert f"passed for another model file, {model_shas['1'][:12]}" in switch_refused()
    for_other_policy = report(model_shas["2"], "c" * 64)
    gated.call("PUT", "/admin/readiness", for_other_policy, status=201)
    assert f"passed for policy {'c' * 12}: the policy changed since" in switch_refused()
    not_ready = report(model_shas["2"], policy_sha, ready=False)
    assert gated.call("PUT", "/admin/readiness", not_ready, status=201)["ready"] is False
    assert f"its newest report {not_ready['sha256'][:12]} is not ready" in switch_refused()

    tampered = report(model_shas["2"], policy_sha, ready=False)
    tampered["items"][-1]["status"] = "pass"
    error = gated.call("PUT", "/admin/readiness", tampered, status=400)["error"]
    assert "content address mismatch: the report was changed after it was made" in error
    gated.call("PUT", "/admin/readiness", report(model="nope"), status=404)
    gated.call("PUT", "/admin/readiness", report(model_shas["2"], policy_sha), token=VIEWER, status=403)
    gated.call("PUT", "/admin/readiness", [1], status=400)
    assert gated.aliases()["stable"] == "1"

    passing = report(model_shas["2"], policy_sha, tag="the real one")
    uploaded = AdminClient(gated.server.url, OPERATOR).upload_report(passing)
    assert uploaded.status == 201, uploaded.body
    assert uploaded.body["sha256"] == passing["sha256"] and uploaded.body["ready"] is True
    view = gated.call("GET", f"{VIEW}/readiness", token=VIEWER)
    assert view["versions"]["2"]["passing"] == passing["sha256"] and view["versions"]["1"]["passing"] is None
    assert {r["sha256"] for r in view["reports"]} == {for_other_policy["sha256"], for_other_file["sha256"],
                                                      not_ready["sha256"], passing["sha256"]}

    change = gated.call("POST", f"{VIEW}/switch", {"version": "2"})
    assert change["after"]["stable"] == "2"
    assert change["gate"] == {"readiness_report": passing["sha256"], "forced": False}
    events = gated.events()
    assert [e["action"] for e in events].count("readiness_report") == 4
    gate_passed, switch = events[-2], events[-1]
    assert (gate_passed["action"], gate_passed["after"]["readiness_report"]) == ("gate_passed", passing["sha256"])
    assert switch["action"] == "switch" and switch["gate"]["readiness_report"] == passing["sha256"]
    upload = next(e for e in events if e["action"] == "readiness_report" and e["after"]["sha256"] == passing["sha256"])
    assert upload["actor"] == "otto" and upload["before"] is None


@pytest.mark.e2e
def test_a_rollout_needs_the_gate_and_a_forced_one_promotes(repo_copy: tuple[Path, Path],
                                                            start_server: StartServer, tmp_path: Path) -> None:
    models, policies = repo_copy
    _rollout_plan(policies)
    gated = Gated(start_server(models, policies, env=ENV, state=tmp_path / "state"))
    try:
        error = gated.call("POST", f"{VIEW}/rollout", {"version": "2"}, status=409)["error"]
        assert f"no passing readiness report for {MODEL} version 2" in error
        gated.call("POST", f"{VIEW}/rollout", {"version": "2", "force": True}, status=403)
        gated.call("POST", f"{VIEW}/rollout", {"version": "2", "force": "yes"}, token=ADMIN, status=400)
        assert gated.rollout() is None and gated.aliases()["canary"] is None

        started = gated.call("POST", f"{VIEW}/rollout", {"version": "2", "force": True}, token=ADMIN)["rollout"]
        assert (started["forced"], started["report_sha256"], started["actor"]) == (True, None, "ada")
        gated.traffic_until(lambda: gated.rollout()["status"] != "running")
        assert gated.rollout()["status"] == "completed" and gated.aliases()["stable"] == "2"
        actions = [e["action"] for e in gated.events()]
        assert actions[:2] == ["gate_refused", "gate_forced"] and "gate_passed" not in actions
        assert actions.count("gate_refused") == 1 and actions[-1] == "promote"  # forced: not checked again
    finally:
        gated.close()


@pytest.mark.e2e
def test_a_rollout_whose_policy_changed_is_held_before_promotion(repo_copy: tuple[Path, Path],
                                                                 start_server: StartServer, tmp_path: Path) -> None:
    models, policies = repo_copy
    _rollout_plan(policies, interval_s=600)  # long enough that it cannot finish before the restart
    first = Gated(start_server(models, policies, env=ENV, state=tmp_path / "state"))
    model_shas, old_policy = first.shas()
    opened = report(model_shas["2"], old_policy)
    first.call("PUT", "/admin/readiness", opened, status=201)
    started = first.call("POST", f"{VIEW}/rollout", {"version": "2"})["rollout"]
    assert (started["forced"], started["report_sha256"]) == (False, opened["sha256"])
    first.close()
    first.server.stop()

    _rollout_plan(policies, interval_s=0.5)  # a policy edit outside `routing`: the rollout resumes
    second = Gated(start_server(models, policies, env=ENV, state=tmp_path / "state"))
    try:
        _, new_policy = second.shas()
        assert new_policy != old_policy
        second.traffic_until(lambda: second.rollout()["status"] != "running")
        held = second.rollout()
        assert held["status"] == "paused", held
        assert "readiness gate" in held["reason"] and "the policy changed since" in held["reason"]
        assert held["history"][-1]["decision"] == "gate_closed"
        assert (second.aliases()["stable"], second.aliases()["canary"]) == ("1", "2")
        refused, paused = second.events()[-2:]
        assert (refused["action"], refused["actor"], refused["after"]["for"]) == ("gate_refused",
                                                                                  "rollout-controller", "promote")
        assert paused["action"] == "rollout_paused" and "readiness gate" in paused["reason"]

        renewed = report(model_shas["2"], new_policy, tag="after the policy change")
        second.call("PUT", "/admin/readiness", renewed, status=201)
        second.call("POST", f"{VIEW}/rollout/resume")
        assert second.rollout()["reason"] == ""
        second.traffic_until(lambda: second.rollout()["status"] != "running")
        done = second.rollout()
        assert done["status"] == "completed" and done["report_sha256"] == renewed["sha256"]
        assert second.aliases()["stable"] == "2"
        promote = second.events()[-1]
        assert promote["action"] == "promote" and promote["gate"]["readiness_report"] == renewed["sha256"]
    finally:
        second.close()


# ---------------------------------------------------------------- in process: gate off or absent, limits


@pytest.mark.parametrize(("section", "shown"), [({"gate": "off"}, "off"), (None, "absent")])
def test_without_an_enforced_gate_nothing_is_gated_or_recorded(repo_copy: tuple[Path, Path], tmp_path: Path,
                                                                section: Any, shown: str) -> None:
    models, policies = repo_copy
    path = policies / f"{MODEL}.yaml"
    document = yaml.safe_load(path.read_text())
    if section is None:
        del document["readiness"]
    else:
        document["readiness"].update(section)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    tokens = json.loads(ENV["GATEWAY_ADMIN_TOKENS"])
    with make_client(models, policies, admin_tokens=tokens, state_dir=tmp_path / "state") as client:
        view = client.get(f"{VIEW}/readiness", headers=bearer(VIEWER)).json()
        assert view["gate"] == shown and view["versions"]["2"]["passing"] is None
        switched = client.post(f"{VIEW}/switch", json={"version": "2"}, headers=bearer(OPERATOR))
        assert switched.status_code == 200 and "gate" not in switched.json()
        events = client.get("/admin/events", headers=bearer(VIEWER)).json()["events"]
        assert [e["action"] for e in events] == ["switch"]


def test_an_oversized_report_is_refused_before_it_is_read(repo_copy: tuple[Path, Path], tmp_path: Path) -> None:
    tokens = json.loads(ENV["GATEWAY_ADMIN_TOKENS"])
    with make_client(*repo_copy, admin_tokens=tokens, state_dir=tmp_path / "state") as client:
        huge = b" " * (16 * 1024 * 1024 + 1)
        answer = client.put("/admin/readiness", content=huge, headers=bearer(OPERATOR))
        assert answer.status_code == 413 and "limit" in answer.json()["error"]
        # other admin bodies keep the ordinary request limit
        answer = client.post(f"{VIEW}/switch", content=b" " * (1024 * 1024 + 1), headers=bearer(OPERATOR))
        assert answer.status_code == 413
        assert not (tmp_path / "state" / "readiness").exists()


def test_a_report_that_is_not_the_checklist_is_rejected_naming_what_differs(tmp_path: Path) -> None:
    from gateway.readiness.report import address_of

    made = report()
    made["items"] = made["items"][:-1]  # governance.environment left out
    made["score"], made["sha256"] = 1.0, ""
    made["sha256"] = address_of(made)
    with pytest.raises(ReportRejected, match=r"not a run of this gateway's checklist.*missing: governance.environment"):
        ReportStore(tmp_path).put(made)


def test_with_a_key_only_signed_reports_are_stored_and_trusted(tmp_path: Path) -> None:
    import shutil

    from gateway.readiness.store import signature_of

    key = "k" * 32
    store = ReportStore(tmp_path / "signed", key=key)
    unsigned = report()
    with pytest.raises(ReportRejected, match="not signed with this gateway's GATEWAY_READINESS_HMAC_KEY"):
        store.put(unsigned)
    wrong = {**unsigned, "signature": signature_of(unsigned["sha256"], "x" * 32)}
    with pytest.raises(ReportRejected, match="not signed"):
        store.put(wrong)
    signed = {**unsigned, "signature": signature_of(unsigned["sha256"], key)}
    assert store.put(signed)["sha256"] == unsigned["sha256"]
    assert store.passing(MODEL, "2", SHA_A, SHA_B) is not None
    # a file planted next to it without the signature opens nothing
    planted = report(tag="planted")
    folder = tmp_path / "signed" / MODEL
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / f"{planted['sha256']}.json").write_text(json.dumps(planted))
    assert store.passing(MODEL, "2", SHA_A, SHA_B) is None
