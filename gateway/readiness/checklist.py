"""The release readiness checklist: six phases of checks, run in order, into one report.

    model_validation -> data_pipeline -> infrastructure -> monitoring -> rollback -> governance

A phase with a failed item skips every later phase (see `report.run_phases`). The report's
context names every input that shaped it (files and their hashes, thresholds, the environment),
so the same inputs give the same report, apart from timings and measurements.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway.readiness import checks_model, checks_ops, checks_serving, fingerprint
from gateway.readiness.context import CannotRun, Context, Target
from gateway.readiness.maturity import maturity
from gateway.readiness.report import ItemResult, Phase, ReadinessReport, run_phases


def phases(ctx: Context) -> list[Phase]:
    """The checklist, bound to one run's context."""
    def bind(check: Callable[[Context], ItemResult]) -> Callable[[], ItemResult]:
        return lambda: check(ctx)

    spec: list[tuple[str, list[tuple[str, str, Callable[[Context], ItemResult]]]]] = [
        ("model_validation", [
            ("loads", "Model file verified against its card and loaded", checks_model.loads),
            ("heldout_metric", "Held-out metric meets the policy's threshold", checks_model.heldout_metric),
            ("leakage", "Time split vs random split (leakage signal)", checks_model.leakage),
            ("golden", "Golden examples reproduced, none regressed against stable", checks_model.golden),
            ("edge_inputs", "Edge and adversarial inputs answered or rejected, never a crash",
             checks_model.edge_inputs),
            ("fairness", "Fairness across the protected groups", checks_model.fairness),
            ("beats_baselines", "Beats the fallback rules and the current stable", checks_model.beats_baselines),
        ]),
        ("data_pipeline", [
            ("served_reference", "Served path reproduces the reference outputs (no training-serving skew)",
             checks_serving.served_reference),
            ("schema_handling", "Schema changes handled as the policy says", checks_serving.schema_handling),
        ]),
        ("infrastructure", [
            ("load_test", "Load test at twice the peak rate meets the SLO", checks_serving.load_test),
            ("soak", "Memory does not grow during a soak", checks_serving.soak),
            ("health", "Health and readiness answer meaningfully", checks_serving.health),
        ]),
        ("monitoring", [
            ("reference_profile", "Reference profile present and drift thresholds set",
             checks_ops.reference_profile),
            ("outcome_monitoring", "Outcome monitoring configured", checks_ops.outcome_monitoring),
            ("alert_rules", "Alert rules with runbooks cover the model", checks_ops.alert_rules),
        ]),
        ("rollback", [
            ("criteria", "Rollback criteria defined", checks_ops.rollback_criteria),
            ("rehearsal", "Switch and rollback rehearsed under load with zero failed requests",
             checks_serving.rehearsal),
            ("fallback_reasons", "The fallback answers for every failure reason", checks_serving.fallback_reasons),
            ("audit_verifies", "The rehearsal's audit log verifies", checks_serving.audit_verifies),
        ]),
        ("governance", [
            ("card_complete", "Model card complete", checks_ops.card_complete),
            ("signoffs", "Sign-offs recorded", checks_ops.signoffs),
            ("environment", "Environment matches production", checks_ops.environment),
        ]),
    ]
    return [Phase(name, [(key, title, bind(check)) for key, title, check in checks]) for name, checks in spec]


def run(target: Target, say: Callable[[str], None] = lambda _: None,
        on_item: Callable[[ItemResult], None] | None = None) -> ReadinessReport:
    """Run the whole checklist; CannotRun when it cannot run at all."""
    started = time.time()
    ctx = Context(target, say)
    ctx.production()  # an unreachable production gateway means the run cannot judge: CannotRun now
    try:
        items = run_phases(phases(ctx), on_item=on_item)
        context = _context(ctx)
        # maturity is about what is configured, so the rules are read even when their item was skipped
        alerts = any(i.key == "alert_rules" and i.status == "pass" for i in items) or (
            ctx.readiness.alert_rules is not None and checks_ops.alert_rules(ctx).status == "pass")
        level = maturity(ctx.policy, ctx.card, alerts) if ctx.card is not None else {"level": 1, "name": "ad hoc"}
    finally:
        ctx.close()
    finished = time.time()
    return ReadinessReport(
        model=target.model, version=target.version, model_sha256=ctx.model_sha256,
        policy_sha256=ctx.loaded.sha256, items=items, context=context, maturity=level,
        timings={"started": _iso(started), "finished": _iso(finished), "seconds": round(finished - started, 1)},
        figures=ctx.figures)


def _context(ctx: Context) -> dict[str, Any]:
    return {
        "policy_file": ctx.loaded.source.rsplit("/", 1)[-1],
        "readiness": ctx.readiness.model_dump(mode="json"),
        "slo": ctx.policy.slo.model_dump(mode="json"),
        "data_files": ctx.data_files(),
        "stable_version": ctx.stable_version,
        "production_url": ctx.production_url,
        "scale": ctx.target.scale,
        "environment": fingerprint.environment(),
    }


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


__all__ = ["CannotRun", "Target", "phases", "run"]
