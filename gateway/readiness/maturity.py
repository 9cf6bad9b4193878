"""A deployment's maturity level, from what its policy and model card configure.

Levels are cumulative: a level counts only when it and every lower level are met. Each level's
entry reports whether its own rules are met and what is missing (`needs`), so a team sees the
next step even when a lower level holds it back.

1. ad hoc: the version is served (always met).
2. repeatable: the policy's schema declares its features explicitly (a non-empty
   `schema.features`), and the card has held-out metrics (a `heldout` entry or an entry with a
   `split`) and golden examples.
3. monitored: the card has a reference profile including a prediction profile, outcome
   (feedback) thresholds are set (at least one of `feedback.accuracy_below`, `auc_below`,
   `brier_above`), and alert rules for the model were found.
4. controlled releases: the policy has a `readiness` section with `gate: enforce`, a circuit
   breaker (`guard.breaker.fail_max`), and a rollout plan with at least one rollback criterion
   (a `rollout.rollback_if` threshold set, or `drift_alert: true`).
5. self-healing: a `fallback` with rules or a default answer, and rollback criteria covering
   errors (`error_rate_gt`), latency (`p99_ms_gt` or `p99_ratio_gt`) and drift (`drift_alert`).
   Low-confidence handling and shadow routing are not required.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.card import ModelCard
from gateway.policy import Policy
from gateway.readiness.governance import has_heldout_metrics

#: level number -> name
LEVELS = {1: "ad hoc", 2: "repeatable", 3: "monitored", 4: "controlled releases", 5: "self-healing"}

_THRESHOLDS = ("error_rate_gt", "p99_ms_gt", "p99_ratio_gt", "fallback_rate_gt", "shadow_disagreement_gt")


def _repeatable(policy: Policy, card: ModelCard, _alerts: bool) -> list[str]:
    needs = []
    if not policy.input_schema.features:
        needs.append("the policy's schema declares no features (schema.features)")
    if not has_heldout_metrics(card):
        needs.append("held-out metrics on the card (metrics.heldout, or an entry with a split)")
    if not card.golden:
        needs.append("golden examples on the card (golden)")
    return needs


def _monitored(policy: Policy, card: ModelCard, alerts: bool) -> list[str]:
    needs = []
    if card.reference_profile is None:
        needs.append("a reference profile on the card (reference_profile)")
    elif card.reference_profile.prediction is None:
        needs.append("a prediction profile in the card's reference profile (reference_profile.prediction)")
    fb = policy.feedback
    if fb.accuracy_below is None and fb.auc_below is None and fb.brier_above is None:
        needs.append("an outcome threshold (feedback.accuracy_below, auc_below or brier_above)")
    if not alerts:
        needs.append("alert rules for the model")
    return needs


def _controlled(policy: Policy, _card: ModelCard, _alerts: bool) -> list[str]:
    needs = []
    if policy.readiness is None:
        needs.append("a readiness section with gate: enforce")
    elif policy.readiness.gate != "enforce":
        needs.append(f"readiness.gate: enforce (it is {policy.readiness.gate})")
    if policy.guard.breaker.fail_max < 1:  # pragma: no cover - the schema requires at least 1
        needs.append("a circuit breaker (guard.breaker.fail_max)")
    criteria = policy.rollout.rollback_if
    if all(getattr(criteria, name) is None for name in _THRESHOLDS) and not criteria.drift_alert:
        needs.append("a rollback criterion (a rollout.rollback_if threshold, or drift_alert: true)")
    return needs


def _self_healing(policy: Policy, _card: ModelCard, _alerts: bool) -> list[str]:
    needs = []
    if policy.fallback is None or not (policy.fallback.rules or policy.fallback.default):
        needs.append("a fallback with rules or a default answer")
    criteria = policy.rollout.rollback_if
    if criteria.error_rate_gt is None:
        needs.append("a rollback criterion on errors (rollout.rollback_if.error_rate_gt)")
    if criteria.p99_ms_gt is None and criteria.p99_ratio_gt is None:
        needs.append("a rollback criterion on latency (rollout.rollback_if.p99_ms_gt or p99_ratio_gt)")
    if not criteria.drift_alert:
        needs.append("a rollback criterion on drift (rollout.rollback_if.drift_alert: true)")
    return needs


_RULES: dict[int, Callable[[Policy, ModelCard, bool], list[str]]] = {
    1: lambda _policy, _card, _alerts: [],
    2: _repeatable,
    3: _monitored,
    4: _controlled,
    5: _self_healing,
}


def maturity(policy: Policy, card: ModelCard, alert_rules_found: bool) -> dict[str, Any]:
    """The deployment's maturity: `{level, name, levels: [{level, name, met, needs}]}` (JSON-ready).

    `level` is the highest level whose rules, and those of every lower level, are met; each entry
    of `levels` reports its own rules (`met`) and what is missing (`needs`).
    """
    levels = []
    reached = 0
    for number, name in LEVELS.items():
        needs = _RULES[number](policy, card, alert_rules_found)
        levels.append({"level": number, "name": name, "met": not needs, "needs": needs})
        if not needs and reached == number - 1:
            reached = number
    return {"level": reached, "name": LEVELS[reached], "levels": levels}
