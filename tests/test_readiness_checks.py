"""Readiness checks that read files (monitoring, rollback criteria, governance) on varied policies and cards.

Each test copies the bundled repository, changes one thing, and runs the one check through a real
`Context` (the policy and card loaded as the checklist would). No staging gateway is started.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.readiness import checks_model, checks_ops
from gateway.readiness.context import CannotRun, Context, Target
from gateway.readiness.fingerprint import environment
from tests.conftest import MODEL, ROOT, patch_policy


def _context(repo: tuple[Path, Path], version: str = "2", **target: Any) -> Context:
    return Context(Target(MODEL, version, repo[0], repo[1], **target))


def test_the_bundled_files_pass_every_file_check(repo: tuple[Path, Path]) -> None:
    ctx = _context(repo)
    for check in (checks_ops.reference_profile, checks_ops.outcome_monitoring, checks_ops.alert_rules,
                  checks_ops.rollback_criteria, checks_ops.card_complete, checks_ops.signoffs):
        result = check(ctx)
        assert result.status == "pass", (check.__name__, result.detail)
    assert checks_ops.environment(ctx).status == "not_applicable"


def test_no_outcome_thresholds_fails_outcome_monitoring(repo: tuple[Path, Path]) -> None:
    patch_policy(repo[1], MODEL, feedback={"auc_below": None, "brier_above": None})
    result = checks_ops.outcome_monitoring(_context(repo))
    assert result.status == "fail" and "no outcome threshold" in result.detail


def test_alert_rules_without_runbooks_or_a_family_fail_naming_them(repo: tuple[Path, Path], tmp_path: Path) -> None:
    rules = yaml.safe_load((ROOT / "docker" / "prometheus" / "alerts.yml").read_text())
    kept = [r for r in rules["groups"][0]["rules"] if "drift" not in r["expr"]]
    kept[0]["annotations"].pop("runbook_url")
    kept[1]["annotations"]["runbook_url"] = "https://example.com/x/docs/runbooks/no-such-page.md"
    rules["groups"][0]["rules"] = kept
    (tmp_path / "docs" / "runbooks").mkdir(parents=True)
    for page in (ROOT / "docs" / "runbooks").iterdir():
        shutil.copy(page, tmp_path / "docs" / "runbooks" / page.name)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    patch_policy(repo[1], MODEL, readiness={"alert_rules": str(tmp_path / "alerts.yml")})
    result = checks_ops.alert_rules(_context(repo))
    assert result.status == "fail"
    assert "no alert for drift" in result.detail
    assert result.evidence["without_runbook"] == [kept[0]["alert"]]
    assert "no-such-page.md" in result.evidence["dead_runbook_links"][0]


def test_rules_for_another_model_do_not_count(repo: tuple[Path, Path], tmp_path: Path) -> None:
    rules = yaml.safe_load((ROOT / "docker" / "prometheus" / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        rule["expr"] = rule["expr"].replace("gateway_breaker_state", 'gateway_breaker_state{model="other"}')
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    patch_policy(repo[1], MODEL, readiness={"alert_rules": str(tmp_path / "alerts.yml")})
    result = checks_ops.alert_rules(_context(repo))
    assert result.status == "fail" and "breaker" in result.evidence["missing"]


def test_rollback_criteria_without_latency_fail(repo: tuple[Path, Path]) -> None:
    patch_policy(repo[1], MODEL, rollout={"rollback_if": {"p99_ratio_gt": None, "p99_ms_gt": None}})
    result = checks_ops.rollback_criteria(_context(repo))
    assert result.status == "fail" and "no latency criterion" in result.detail


def test_an_incomplete_card_and_missing_signoffs_fail_governance(repo: tuple[Path, Path]) -> None:
    card_path = repo[0] / MODEL / "2" / "model.yaml"
    card = yaml.safe_load(card_path.read_text())
    card["intended_use"] = ""
    card["limitations"] = []
    card_path.write_text(yaml.safe_dump(card, sort_keys=False))
    (repo[0] / MODEL / "2" / "signoffs.yaml").unlink()
    ctx = _context(repo)
    card_result = checks_ops.card_complete(ctx)
    assert card_result.status == "fail" and "intended" in card_result.detail and "limitation" in card_result.detail
    signoffs = checks_ops.signoffs(ctx)
    assert signoffs.status == "fail" and "no signoffs.yaml" in signoffs.detail


def test_a_missing_required_role_fails_signoffs(repo: tuple[Path, Path]) -> None:
    patch_policy(repo[1], MODEL, readiness={"required_signoffs": ["model_owner", "risk_officer", "legal"]})
    result = checks_ops.signoffs(_context(repo))
    assert result.status == "fail" and "legal" in result.detail


def test_an_environment_that_differs_from_production_fails_naming_the_difference(repo: tuple[Path, Path]) -> None:
    ctx = _context(repo, production_url="http://127.0.0.1:9")  # never contacted: its status is injected below
    remote = environment()
    remote["onnxruntime"] = {**remote["onnxruntime"], "version": "0.0.1"}
    versions = [{"version": "2", "sha256": "0" * 64}]
    ctx.production_status = {"server": {"environment": remote},
                             "models": [{"name": MODEL, "versions": versions, "aliases": {"stable": "1"}}]}
    result = checks_ops.environment(ctx)
    assert result.status == "fail"
    assert "onnxruntime.version" in result.detail and "model.sha256" in result.detail


def test_an_unreachable_production_gateway_means_the_run_cannot_judge(repo: tuple[Path, Path]) -> None:
    from gateway.readiness.checklist import run

    with pytest.raises(CannotRun, match="production gateway"):
        run(Target(MODEL, "2", repo[0], repo[1], production_url="http://127.0.0.1:9"))


def test_a_model_file_that_does_not_match_its_card_fails_loading_and_skips_the_rest(repo: tuple[Path, Path]) -> None:
    from gateway.readiness.checklist import run

    path = repo[0] / MODEL / "2" / "model.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    report = run(Target(MODEL, "2", repo[0], repo[1]))
    first = report.items[0]
    assert (first.key, first.status) == ("loads", "fail") and "sha256" in first.detail
    assert {i.status for i in report.items[1:7]} == {"fail"}  # every model check says why it could not run
    assert {i.status for i in report.items[7:]} == {"skipped"}


def test_no_protected_groups_makes_fairness_not_applicable(repo: tuple[Path, Path]) -> None:
    patch_policy(repo[1], MODEL, readiness={"fairness": {"groups": []}})
    assert checks_model.fairness(_context(repo)).status == "not_applicable"


def test_policy_and_version_problems_cannot_run(repo: tuple[Path, Path]) -> None:
    with pytest.raises(CannotRun, match="no model file"):
        _context(repo, version="9")
    with pytest.raises(CannotRun, match="no policy for model"):
        Context(Target("nobody", "1", repo[0], repo[1]))
    (repo[1] / f"{MODEL}.yaml").write_text(f"model: {MODEL}\nschema: {{features: {{}}}}\nguard: {{timeout_ms: 0}}\n")
    with pytest.raises(CannotRun, match=r"policy is invalid:[\s\S]*:3:"):
        _context(repo)


def test_cpu_steal_is_the_share_of_the_steal_column() -> None:
    from gateway.readiness.checks_serving import cpu_times, steal_share

    before = [100, 0, 10, 800, 0, 0, 0, 90, 0, 0]
    after = [150, 0, 20, 900, 0, 0, 0, 130, 0, 0]
    assert steal_share(before, after) == pytest.approx(40 / 200)
    assert steal_share(before, before) is None and steal_share(None, after) is None
    sample = cpu_times()
    assert sample is None or len(sample) >= 8


def test_maturity_reads_the_configuration_even_when_a_phase_fails_early(repo: tuple[Path, Path]) -> None:
    from gateway.readiness.checklist import run

    patch_policy(repo[1], MODEL, readiness={"threshold": 0.99})  # fails the first phase: everything after is skipped
    report = run(Target(MODEL, "2", repo[0], repo[1]))
    assert report.items[1].status == "fail" and report.items[-1].status == "skipped"
    assert report.maturity["level"] == 5


@pytest.fixture
def repo(readiness_repo: tuple[Path, Path]) -> tuple[Path, Path]:
    """The readiness copy of the repository (tests/conftest.py)."""
    return readiness_repo


def test_the_latency_figure_shows_buckets_side_by_side_up_to_the_slo_or_the_slowest_answer() -> None:
    from gateway.readiness.checks_serving import latency_figure

    figure = latency_figure([0.5, 2.5, 2.6, 4.0, 12.0], "t", "v2", p99_limit_ms=50)
    assert figure["kind"] == "bars" and figure["categories"][0] == "0-1 ms"
    assert figure["categories"][-1] == "30-50 ms"  # the SLO's bucket is shown even with nothing in it
    assert sum(figure["series"][0]["values"]) == pytest.approx(1.0)
    slow = latency_figure([2000.0], "t", "v2", p99_limit_ms=50)
    assert slow["categories"][-1] == ">=1000 ms" and slow["series"][0]["values"][-1] == 1.0
    assert latency_figure([], "t", "v2", 50)["series"][0]["values"] == [0.0] * 10
