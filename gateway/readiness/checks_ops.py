"""Phases 4 and 6: monitoring configured, rollback criteria defined, governance recorded.

These read files (policy, card, alert rules, sign-offs) and, when a production URL is given, the
production gateway's status; they start nothing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from gateway.readiness import fingerprint, governance
from gateway.readiness.context import Context, item
from gateway.readiness.report import ItemResult

#: the alert families a served model needs, by a metric name each family's expressions use
ALERT_FAMILIES = {
    "errors": ("gateway_requests_total", "error"),
    "latency": ("gateway_request_duration_seconds", "p99"),
    "drift": ("gateway_drift_state", None),
    "fallback": ("gateway_fallback", None),
    "breaker": ("gateway_breaker_state", None),
    "outcome": ("gateway_outcome", None),
    "readiness": ("gateway_model_ready", None),
}


# --- phase 4: monitoring --------------------------------------------------------------------------


def reference_profile(ctx: Context) -> ItemResult:
    """The card carries a reference profile for every feature and the score; drift thresholds are set."""
    card = ctx.require_card()
    profile = card.reference_profile
    drift = ctx.policy.drift
    explicit = "drift" in ctx.policy_sections
    evidence: dict[str, Any] = {"drift_section_in_policy": explicit,
                                "thresholds": {k: {"metric": r.metric, "warn": r.warn, "alert": r.alert}
                                               for k, r in (("numeric", drift.numeric),
                                                            ("categorical", drift.categorical),
                                                            ("prediction", drift.prediction))},
                                "window": drift.window, "min_rows": drift.min_rows}
    if profile is None:
        return item("fail", "the card has no reference profile: drift cannot be measured", evidence)
    features = set(ctx.policy.input_schema.features)
    missing = sorted(features - set(profile.features))
    evidence.update({"profiled_features": len(profile.features), "missing": missing,
                     "prediction_profile": profile.prediction is not None})
    problems = []
    if missing:
        problems.append(f"no reference for {', '.join(missing)}")
    if profile.prediction is None:
        problems.append("no reference for the score")
    if problems:
        return item("fail", "; ".join(problems), evidence)
    where = "the policy's drift section" if explicit else "the default drift thresholds"
    return item("pass", f"reference for all {len(features)} features and the score; {where} apply", evidence)


def outcome_monitoring(ctx: Context) -> ItemResult:
    """Delayed labels are judged against thresholds, so a model that quietly gets worse raises an alert."""
    feedback = ctx.policy.feedback
    set_ = {k: v for k, v in (("accuracy_below", feedback.accuracy_below), ("auc_below", feedback.auc_below),
                              ("brier_above", feedback.brier_above)) if v is not None}
    evidence = {"thresholds": set_, "window": feedback.window, "min_labels": feedback.min_labels}
    if not set_:
        return item("fail", "no outcome threshold (feedback.accuracy_below / auc_below / brier_above): a model that "
                            "gets worse is noticed only by its users", evidence)
    return item("pass", "outcome monitoring alerts on " + ", ".join(f"{k} {v}" for k, v in set_.items()), evidence)


def alert_rules_path(ctx: Context) -> Path | None:
    """The alert rules file the policy names (relative to the policy file)."""
    name = ctx.readiness.alert_rules
    return None if name is None else (Path(ctx.loaded.source).parent / name).resolve()


def alert_rules(ctx: Context) -> ItemResult:
    """Prometheus alert rules cover the model's failure modes, each with a runbook that exists."""
    path = alert_rules_path(ctx)
    if path is None:
        return item("fail", "the policy names no alert rules file (readiness.alert_rules)")
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return item("fail", f"cannot read the alert rules {path.name}: {exc}")
    groups = document.get("groups") if isinstance(document, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("rules", []), list)
                                               for g in groups):
        return item("fail", f"{path.name} is not a Prometheus rules file (a `groups` list of rule groups)")
    rules = [r for g in groups for r in g.get("rules", []) if isinstance(r, dict) and "alert" in r]
    model = ctx.target.model
    applies = [r for r in rules if _applies(r.get("expr", ""), model)]
    covered: dict[str, list[str]] = {}
    no_runbook, dead_links = [], []
    for rule in applies:
        expr = str(rule.get("expr", ""))
        for family, (metric, hint) in ALERT_FAMILIES.items():
            if metric in expr and (hint is None or hint in expr or hint in str(rule.get("alert", "")).lower()):
                covered.setdefault(family, []).append(rule["alert"])
        url = (rule.get("annotations") or {}).get("runbook_url")
        if not url:
            no_runbook.append(rule["alert"])
        elif not _runbook_exists(url, path):
            dead_links.append(f"{rule['alert']}: {url}")
    missing = sorted(set(ALERT_FAMILIES) - set(covered))
    evidence = {"file": path.name, "rules": len(rules), "apply_to_model": len(applies),
                "covered": {k: sorted(v) for k, v in sorted(covered.items())}, "missing": missing,
                "without_runbook": no_runbook, "dead_runbook_links": dead_links}
    problems = []
    if missing:
        problems.append(f"no alert for {', '.join(missing)}")
    if no_runbook:
        problems.append(f"{len(no_runbook)} alerts without a runbook_url")
    if dead_links:
        problems.append(f"{len(dead_links)} runbook links point at missing pages")
    if problems:
        return item("fail", "; ".join(problems), evidence)
    return item("pass", f"{len(applies)} alert rules cover {', '.join(sorted(covered))}, each with a runbook",
                evidence)


def _applies(expr: str, model: str) -> bool:
    """A rule applies unless it selects other models only (`model="x"` for another x)."""
    named = re.findall(r'model\s*=\s*"([^"]*)"', expr)
    return not named or model in named


def _runbook_exists(url: str, rules_file: Path) -> bool:
    """A runbook link naming docs/runbooks/<page> must have that page in the repository."""
    match = re.search(r"(docs/runbooks/[^#?]+)", url)
    if match is None:
        return True  # an external runbook: not ours to check
    for parent in rules_file.parents:
        if (parent / "docs" / "runbooks").is_dir():
            return (parent / match.group(1)).is_file()
    return True


# --- phase 5: rollback criteria -----------------------------------------------------------------


def rollback_criteria(ctx: Context) -> ItemResult:
    """The policy says when a release is rolled back: errors and latency at least."""
    criteria = ctx.policy.rollout.rollback_if
    set_ = {k: v for k, v in criteria.model_dump().items() if v not in (None, False)}
    explicit = "rollout" in ctx.policy_sections
    evidence = {"criteria": set_, "explicit_in_policy": explicit, "steps": list(ctx.policy.rollout.steps),
                "interval_s": ctx.policy.rollout.interval_s, "min_requests": ctx.policy.rollout.min_requests}
    problems = []
    if "error_rate_gt" not in set_:
        problems.append("no error-rate criterion")
    if not {"p99_ms_gt", "p99_ratio_gt"} & set(set_):
        problems.append("no latency criterion")
    if problems:
        return item("fail", "; ".join(problems), evidence)
    source = "the policy" if explicit else "the defaults (the policy has no rollout section)"
    return item("pass", f"rollback on {', '.join(sorted(set_))} ({source})", evidence)


# --- phase 6: governance --------------------------------------------------------------------------


def card_complete(ctx: Context) -> ItemResult:
    """The card names owner, intended use, limitations, data and held-out metrics."""
    card = ctx.require_card()
    problems = governance.card_problems(card)
    evidence = {"owner": card.owner, "limitations": len(card.limitations), "metrics": sorted(card.metrics),
                "problems": problems}
    if problems:
        return item("fail", "the card lacks: " + "; ".join(problems), evidence)
    return item("pass", f"owner {card.owner}, intended use, {len(card.limitations)} limitations, data and metrics",
                evidence)


def signoffs(ctx: Context) -> ItemResult:
    """Every required role approved this version in signoffs.yaml next to the card."""
    path = ctx.version_dir / governance.SIGNOFF_FILE
    required = ctx.readiness.required_signoffs
    if not required:
        return item("not_applicable", "the policy requires no sign-offs")
    if not path.is_file():
        return item("fail", f"no {governance.SIGNOFF_FILE} next to the card (required: {', '.join(required)})",
                    {"required_roles": required})
    try:
        recorded = governance.read_signoffs(path)
    except governance.SignoffError as exc:
        return item("fail", f"{governance.SIGNOFF_FILE} is invalid: {exc}", {"required_roles": required})
    ok, detail, evidence = governance.judge_signoffs(recorded, required, datetime.now(UTC))
    return item("pass" if ok else "fail", detail, evidence)


def environment(ctx: Context) -> ItemResult:
    """This environment matches production's (when a production URL is given)."""
    local = fingerprint.environment()
    status = ctx.production()
    if status is None:
        return item("not_applicable", "no production URL given (--production-url or readiness.production_url)",
                    {"local": local})
    remote = (status.get("server") or {}).get("environment")
    if not isinstance(remote, dict):
        return item("fail", "the production gateway does not report its environment in /status")
    differences = fingerprint.compare(local, remote)
    blocking = [d for d in differences if d["severity"] == "must_match"]
    versions = {}
    for model in status.get("models", []):
        if model.get("name") == ctx.target.model:
            versions = {v.get("version"): v.get("sha256") for v in model.get("versions", [])}
            policy = (model.get("policy") or {}).get("sha256")
            evidence_policy = {"production_policy_sha256": policy, "this_policy_sha256": ctx.loaded.sha256}
            break
    else:
        evidence_policy = {"production_policy_sha256": None, "this_policy_sha256": ctx.loaded.sha256}
    produced = versions.get(ctx.target.version)
    if produced != ctx.model_sha256:  # absent too: production must hold the very file that was judged
        blocking.append({"key": "model.sha256", "local": ctx.model_sha256, "remote": produced,
                         "severity": "must_match"})
    if evidence_policy["production_policy_sha256"] != ctx.loaded.sha256:
        blocking.append({"key": "policy.sha256", "local": ctx.loaded.sha256,
                         "remote": evidence_policy["production_policy_sha256"], "severity": "must_match"})
    evidence = {"differences": differences, **evidence_policy, "production_has_version": produced is not None}
    if blocking:
        hint = (" (load the version there first: `gateway load MODEL --version V`)" if produced is None else "")
        return item("fail", "differs from production in " + ", ".join(d["key"] for d in blocking) + hint, evidence)
    return item("pass", f"matches production ({len(differences)} informational differences)", evidence)
