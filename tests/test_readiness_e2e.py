"""The readiness checklist end to end: the example v2, deliberately bad candidates, the CLI and the gate.

Candidates are real ONNX models trained here with the bundled build script's own pipeline
(scikit-learn + skl2onnx, dev dependencies): one that ignores the strongest feature, one biased
against older applicants. Runs use `scale` to keep load phases short and a policy copy whose p99
objective is loose: whether this shared machine meets 50 ms is the load tests' question
(loadtests/), not this file's; here every item must pass or fail for the reason it states.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from gateway.audit import records
from gateway.readiness.checklist import Target, run
from gateway.readiness.report import ReadinessReport, address_of
from tests.conftest import MODEL, MODELS, POLICIES, ROOT, RunningServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCALE = 0.05  # load 1 s at 2 x peak, soak 3 s, rehearsal 3 s


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_credit_risk", MODELS / "build_credit_risk.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_repository(root: Path) -> tuple[Path, Path]:
    """Models (with data and sign-offs) and policies; the policy's alert rules point at the repo's."""
    import shutil

    models = root / "models"
    shutil.copytree(MODELS, models, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    policies = root / "policies"
    shutil.copytree(POLICIES, policies)
    path = policies / f"{MODEL}.yaml"
    document = yaml.safe_load(path.read_text())
    document["slo"]["p99_ms"] = 5000  # a shared VM's hypervisor steals up to 40 % of the CPU here
    document["readiness"]["alert_rules"] = str(ROOT / "docker" / "prometheus" / "alerts.yml")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return models, policies


def _add_candidate(models: Path, version: str, describe: str, prepare: Any) -> None:
    """Train the bundled logistic-regression pipeline on prepared training rows; write file and card."""
    import numpy as np
    import onnxruntime as ort
    import pandas as pd

    build = _build_module()
    frame = pd.read_csv(models / MODEL / "data" / "applications.csv")
    train = prepare(frame[frame["split"] == "train"].copy())
    pipeline = build.candidate_models()["1"][1]
    pipeline.fit(train[build.FEATURES], train["default"])
    onnx_bytes = build.to_onnx_bytes(pipeline)
    target = models / MODEL / version
    target.mkdir()
    (target / "model.onnx").write_bytes(onnx_bytes)
    card = yaml.safe_load((models / MODEL / "1" / "model.yaml").read_text())
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    golden = card["golden"]
    inputs = pd.DataFrame([g["inputs"] for g in golden])
    inputs["credit_history_years"] = inputs["credit_history_years"].astype(float)
    labels, probabilities = session.run(None, build.onnx_feeds(inputs))
    for i, example in enumerate(golden):
        example["outputs"] = {"label": int(labels[i]), "probabilities": [round(float(p), 7) for p in probabilities[i]]}
    card.update(version=version, description=describe, sha256=build.sha256_bytes(onnx_bytes), golden=golden)
    assert np.isfinite(probabilities).all()
    (target / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the example repository with two bad candidates: v3 ignores debt-to-income, v4 is
    biased against applicants aged 62 and over."""
    models, policies = _copy_repository(tmp_path_factory.mktemp("readiness"))

    def blind(train: Any) -> Any:
        train["debt_to_income"] = 0.3  # the model never sees the strongest risk factor vary
        return train

    def biased(train: Any) -> Any:
        train.loc[train["age"] >= 62, "default"] = 1  # taught that every older applicant defaults
        return train

    _add_candidate(models, "3", "Ignores debt-to-income (a deliberately bad candidate).", blind)
    _add_candidate(models, "4", "Biased against older applicants (a deliberately bad candidate).", biased)
    return models, policies


def _by_key(report: ReadinessReport) -> dict[str, Any]:
    return {f"{i.phase}.{i.key}": i for i in report.items}


def test_the_example_v2_passes_every_item_and_reaches_the_top_maturity(repository: tuple[Path, Path]) -> None:
    models, policies = repository
    seen: list[str] = []
    report = run(Target(MODEL, "2", models, policies, scale=SCALE), on_item=lambda i: seen.append(i.key))
    items = _by_key(report)
    not_passed = {k: (i.status, i.detail) for k, i in items.items() if i.status not in ("pass", "not_applicable")}
    assert not_passed == {}
    assert items["governance.environment"].status == "not_applicable"  # no production URL given
    assert report.ready and report.band == "ready" and report.maturity["level"] == 5
    assert len(seen) == len(report.items) == 22
    # the evidence names its figures, and the report knows what it was judged on
    assert items["model_validation.beats_baselines"].evidence["stable v1"]["value"] == pytest.approx(0.7441, abs=1e-3)
    assert set(report.context["data_files"]) == {"heldout.csv", "applications.csv", "golden.jsonl"}
    assert {f["id"] for f in report.figures} >= {"latency", "score-distribution", "group-rates", "rss"}
    back = json.loads(json.dumps(report.as_json()))
    assert address_of(back) == report.sha256


def test_the_same_inputs_give_the_same_address_apart_from_timings(repository: tuple[Path, Path]) -> None:
    models, policies = repository
    first = run(Target(MODEL, "3", models, policies, scale=SCALE))
    second = run(Target(MODEL, "3", models, policies, scale=SCALE))
    assert first.sha256 == second.sha256
    assert first.timings != second.timings or first.timings["started"] == second.timings["started"]


def test_a_candidate_that_ignores_a_feature_fails_the_metric_items_and_later_phases_are_skipped(
        repository: tuple[Path, Path]) -> None:
    models, policies = repository
    report = run(Target(MODEL, "3", models, policies, scale=SCALE))
    items = _by_key(report)
    assert items["model_validation.loads"].status == "pass"
    baselines = items["model_validation.beats_baselines"]
    assert baselines.status == "fail" and "stable v1" in baselines.detail
    assert baselines.evidence["stable v1"]["improvement"] < 0
    # the card copied v1's claims; the measured value is reported next to them, not trusted
    heldout = items["model_validation.heldout_metric"]
    assert heldout.evidence["card_claims"] == pytest.approx(0.7441)
    assert heldout.evidence["value"] < 0.7441
    assert items["model_validation.fairness"].status == "pass"
    assert all(i.status == "skipped" for i in report.items if i.phase != "model_validation")
    assert not report.ready and report.band == "delay"


def test_a_candidate_biased_against_a_group_fails_fairness_naming_the_group(repository: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    import shutil

    models, policies = repository
    ages = tmp_path / "policies"
    shutil.copytree(policies, ages)
    path = ages / f"{MODEL}.yaml"
    document = yaml.safe_load(path.read_text())
    document["readiness"]["fairness"]["groups"] = [{"column": "gender"}, {"column": "age", "bins": [62]}]
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    report = run(Target(MODEL, "4", models, ages, scale=SCALE))
    fairness = _by_key(report)["model_validation.fairness"]
    assert fairness.status == "fail"
    assert "age: favourable-rate ratio" in fairness.detail and ">=62" in fairness.detail
    age = fairness.evidence["groups"]["age"]
    assert age["positive_rate_ratio"] < 0.5 and age["lowest_group"] == ">=62"
    assert fairness.evidence["groups"]["gender"]["ratio_ok"]
    # under the same policy the example v2 treats the age groups far more alike
    from gateway.readiness import checks_model
    from gateway.readiness.context import Context

    fair = checks_model.fairness(Context(Target(MODEL, "2", models, ages)))
    assert fair.evidence["groups"]["age"]["positive_rate_ratio"] > 2 * age["positive_rate_ratio"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "gateway", "readiness", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, **(env or {})}, check=False)


def test_the_cli_writes_the_reports_and_its_exit_code_says_ready_not_ready_or_could_not_run(
        repository: tuple[Path, Path], tmp_path: Path) -> None:
    models, policies = repository
    common = ["--models", str(models), "--policies", str(policies), "--scale", str(SCALE), "--store",
              str(tmp_path / "store")]
    bad = _cli(MODEL, "3", *common, "--out", str(tmp_path / "bad"))
    assert bad.returncode == 1, bad.stderr
    assert "NOT READY" in bad.stdout and "FAIL model_validation.beats_baselines" in bad.stdout
    assert "model_validation.loads" in bad.stderr  # progress, one line per item
    page = (tmp_path / "bad" / f"{MODEL}-3-readiness.html").read_text()
    assert "<svg" in page and "http://" not in page and "https://" not in page
    markdown = (tmp_path / "bad" / f"{MODEL}-3-readiness.md").read_text()
    assert "beats" in markdown
    stored = json.loads((tmp_path / "bad" / f"{MODEL}-3-readiness.json").read_text())
    assert (tmp_path / "store" / MODEL / f"{stored['sha256']}.json").is_file()

    missing = _cli(MODEL, "99", *common, "--out", str(tmp_path / "none"))
    assert missing.returncode == 2 and "cannot run" in missing.stderr and "99" in missing.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"{MODEL}.yaml").write_text(f"model: {MODEL}\nschema:\n  features: {{}}\nslo: {{p99_ms: -1}}\n")
    invalid = _cli(MODEL, "2", "--models", str(models), "--policies", str(broken), "--out", str(tmp_path / "x"))
    assert invalid.returncode == 2 and "slo.p99_ms" in invalid.stderr and ":4:" in invalid.stderr


def test_a_report_from_the_cli_opens_the_promotion_gate_and_is_audited(repository: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    models, policies = repository
    state = tmp_path / "state"
    gateway = RunningServer(models, policies, env={"GATEWAY_ADMIN_TOKENS": json.dumps(
        [{"name": "ci", "role": "operator", "token": "t" * 32}])}, state=state)
    try:
        gateway.wait_live()
        admin = {"Authorization": "Bearer " + "t" * 32}
        refused = httpx.post(f"{gateway.url}/admin/models/{MODEL}/switch", json={"version": "2"}, headers=admin)
        assert refused.status_code == 409 and "readiness" in refused.json()["error"]
        made = _cli(MODEL, "2", "--models", str(models), "--policies", str(policies), "--scale", str(SCALE),
                    "--out", str(tmp_path / "out"), "--no-store", "--submit", gateway.url,
                    "--production-url", gateway.url, env={"GATEWAY_TOKEN": "t" * 32})
        assert made.returncode == 0, made.stdout + made.stderr
        assert "submitted" in made.stdout
        document = json.loads((tmp_path / "out" / f"{MODEL}-2-readiness.json").read_text())
        sha = document["sha256"]
        environment = next(i for i in document["items"] if i["key"] == "environment")
        assert environment["status"] == "pass"  # production (this gateway) runs on this very machine
        assert environment["evidence"]["production_has_version"] is True
        switched = httpx.post(f"{gateway.url}/admin/models/{MODEL}/switch", json={"version": "2"}, headers=admin)
        assert switched.status_code == 200, switched.text
    finally:
        gateway.stop()
    control = [r for r in records(state.parent / f"{state.name}-audit") if r.get("kind") == "control"]
    actions = [r["action"] for r in control]
    assert "readiness_report" in actions and "gate_passed" in actions and "switch" in actions
    uploaded = next(r for r in control if r["action"] == "readiness_report")
    assert uploaded["after"]["sha256"] == sha


def test_the_admin_api_runs_the_checklist_in_a_child_process_and_serves_the_report(
        repository: tuple[Path, Path], tmp_path: Path) -> None:
    import time

    models, policies = repository
    state = tmp_path / "state"
    gateway = RunningServer(models, policies, env={"GATEWAY_ADMIN_TOKENS": json.dumps(
        [{"name": "ops", "role": "operator", "token": "o" * 32}])}, state=state)
    admin = {"Authorization": "Bearer " + "o" * 32}
    try:
        gateway.wait_live()
        url = f"{gateway.url}/admin/models/{MODEL}/versions/2/readiness"
        bad = httpx.post(url, json={"scale": "fast"}, headers=admin)
        assert bad.status_code == 400 and "scale" in bad.text
        started = httpx.post(url, json={"scale": SCALE}, headers=admin)
        assert started.status_code == 202, started.text
        assert started.json()["run"]["status"] == "running"
        again = httpx.post(url, json={"scale": SCALE}, headers=admin)
        assert again.status_code == 409 and "still running" in again.json()["error"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            run_view = httpx.get(f"{gateway.url}/admin/readiness/runs", headers=admin).json()["runs"][0]
            if run_view["status"] != "running":
                break
            time.sleep(1)
        assert run_view["status"] == "ready", run_view["output"][-2000:]
        sha = run_view["report"]["sha256"]
        page = httpx.get(f"{gateway.url}/admin/models/{MODEL}/readiness/{sha}", params={"format": "html"},
                         headers=admin)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<svg" in page.text
        assert httpx.get(f"{gateway.url}/admin/models/{MODEL}/readiness/{'0' * 64}", headers=admin).status_code == 404
        listing = httpx.get(f"{gateway.url}/admin/models/{MODEL}/readiness", headers=admin).json()
        assert listing["versions"]["2"]["passing"] == sha
        switched = httpx.post(f"{gateway.url}/admin/models/{MODEL}/switch", json={"version": "2"}, headers=admin)
        assert switched.status_code == 200, switched.text
    finally:
        gateway.stop()
    actions = [r["action"] for r in records(state.parent / f"{state.name}-audit") if r.get("kind") == "control"]
    assert actions.index("readiness_run") < actions.index("readiness_report") < actions.index("switch")
