"""The maturity level, from the bundled policy and card varied one configuration at a time."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.card import ModelCard, load_card
from gateway.policy import Feedback, Policy, Readiness, RollbackCriteria, Rollout, load_policy
from gateway.readiness.maturity import LEVELS, maturity
from tests.conftest import MODEL, MODELS, POLICIES


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_card(MODELS / MODEL / "2" / "model.yaml")


@pytest.fixture(scope="module")
def policy() -> Policy:
    """The bundled policy with every level-5 configuration set explicitly (it is edited over time)."""
    bundled = load_policy(POLICIES / f"{MODEL}.yaml").policy
    assert bundled.fallback is not None
    return bundled.model_copy(update={
        "feedback": Feedback(auc_below=0.7),
        "readiness": Readiness(gate="enforce"),
        "rollout": Rollout(rollback_if=RollbackCriteria(error_rate_gt=0.02, p99_ratio_gt=2.0, drift_alert=True)),
    })


def needs(result: dict[str, Any], level: int) -> list[str]:
    (entry,) = [e for e in result["levels"] if e["level"] == level]
    return list(entry["needs"])


def with_rollback(policy: Policy, **criteria: Any) -> Policy:
    return policy.model_copy(update={"rollout": Rollout(rollback_if=RollbackCriteria(**criteria))})


def test_a_fully_configured_deployment_is_self_healing(policy: Policy, card: ModelCard) -> None:
    result = maturity(policy, card, alert_rules_found=True)
    assert (result["level"], result["name"]) == (5, "self-healing")
    assert [(e["level"], e["name"], e["met"], e["needs"]) for e in result["levels"]] == \
        [(n, name, True, []) for n, name in LEVELS.items()]


def test_levels_are_cumulative(policy: Policy, card: ModelCard) -> None:
    result = maturity(policy, card, alert_rules_found=False)
    assert (result["level"], result["name"]) == (2, "repeatable")
    assert needs(result, 3) == ["alert rules for the model"]
    # the higher levels' own rules still hold; they just do not count
    assert [e["met"] for e in result["levels"]] == [True, True, False, True, True]


def test_repeatable_needs_features_heldout_metrics_and_golden_examples(policy: Policy, card: ModelCard) -> None:
    no_features = policy.model_copy(update={"input_schema": policy.input_schema.model_copy(update={"features": {}})})
    result = maturity(no_features, card, True)
    assert result["level"] == 1 and result["name"] == "ad hoc"
    assert needs(result, 2) == ["the policy's schema declares no features (schema.features)"]
    bare_card = card.model_copy(update={"golden": [], "metrics": {"validation": {"auc": 0.9}}})
    assert [n.split(" (")[0] for n in needs(maturity(policy, bare_card, True), 2)] == \
        ["held-out metrics on the card", "golden examples on the card"]
    split_card = card.model_copy(update={"metrics": {"latest": {"auc": 0.8, "split": "random"}}})
    assert maturity(policy, split_card, True)["level"] == 5


def test_monitored_needs_a_prediction_profile_and_an_outcome_threshold(policy: Policy, card: ModelCard) -> None:
    assert card.reference_profile is not None
    no_prediction = card.model_copy(update={
        "reference_profile": card.reference_profile.model_copy(update={"prediction": None})})
    result = maturity(policy.model_copy(update={"feedback": Feedback()}), no_prediction, True)
    assert result["level"] == 2
    assert [n.split(" (")[0] for n in needs(result, 3)] == ["a prediction profile in the card's reference profile",
                                                            "an outcome threshold"]
    no_profile = card.model_copy(update={"reference_profile": None})
    assert needs(maturity(policy, no_profile, True), 3) == ["a reference profile on the card (reference_profile)"]
    for threshold in ({"accuracy_below": 0.8}, {"brier_above": 0.2}):
        assert maturity(policy.model_copy(update={"feedback": Feedback(**threshold)}), card, True)["level"] == 5


def test_controlled_releases_need_an_enforced_gate_and_a_rollback_criterion(policy: Policy, card: ModelCard) -> None:
    for readiness, missing in ((None, "a readiness section with gate: enforce"),
                               (Readiness(gate="off"), "readiness.gate: enforce (it is off)")):
        result = maturity(policy.model_copy(update={"readiness": readiness}), card, True)
        assert result["level"] == 3 and needs(result, 4) == [missing]
    nothing = with_rollback(policy, error_rate_gt=None, p99_ratio_gt=None, fallback_rate_gt=None, drift_alert=False)
    result = maturity(nothing, card, True)
    assert result["level"] == 3 and needs(result, 4)[0].startswith("a rollback criterion")
    only_fallback_rate = with_rollback(policy, error_rate_gt=None, p99_ratio_gt=None, drift_alert=False)
    assert maturity(only_fallback_rate, card, True)["level"] == 4


def test_self_healing_needs_a_fallback_and_rollback_on_errors_latency_and_drift(policy: Policy,
                                                                               card: ModelCard) -> None:
    result = maturity(policy.model_copy(update={"fallback": None}), card, True)
    assert result["level"] == 4 and needs(result, 5) == ["a fallback with rules or a default answer"]
    only_drift = with_rollback(policy, error_rate_gt=None, p99_ratio_gt=None, fallback_rate_gt=None)
    result = maturity(only_drift, card, True)
    assert result["level"] == 4
    assert [n.split(" (")[0] for n in needs(result, 5)] == ["a rollback criterion on errors",
                                                            "a rollback criterion on latency"]
    absolute_latency = with_rollback(policy, p99_ratio_gt=None, p99_ms_gt=80.0)
    assert maturity(absolute_latency, card, True)["level"] == 5
    no_drift = with_rollback(policy, drift_alert=False)
    assert needs(maturity(no_drift, card, True), 5) == [
        "a rollback criterion on drift (rollout.rollback_if.drift_alert: true)"]
    # low-confidence handling and shadow routing are not required
    assert policy.fallback is not None
    plain_fallback = policy.fallback.model_copy(update={"low_confidence": None})
    assert maturity(policy.model_copy(update={"fallback": plain_fallback}), card, True)["level"] == 5


def test_the_bundled_example_is_at_least_repeatable(card: ModelCard) -> None:
    bundled = load_policy(POLICIES / f"{MODEL}.yaml").policy
    result = maturity(bundled, card, alert_rules_found=True)
    assert result["level"] >= 2 and result["name"] == LEVELS[result["level"]]
