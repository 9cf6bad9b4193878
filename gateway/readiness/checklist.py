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
from gateway.readiness.items import CHECKLIST
from gateway.readiness.maturity import maturity
from gateway.readiness.report import ItemResult, Phase, ReadinessReport, run_phases


def phases(ctx: Context) -> list[Phase]:
    """The checklist, bound to one run's context."""
    def bind(check: Callable[[Context], ItemResult]) -> Callable[[], ItemResult]:
        return lambda: check(ctx)

    checks: dict[str, Callable[[Context], ItemResult]] = {
        "loads": checks_model.loads, "heldout_metric": checks_model.heldout_metric,
        "leakage": checks_model.leakage, "golden": checks_model.golden, "edge_inputs": checks_model.edge_inputs,
        "fairness": checks_model.fairness, "beats_baselines": checks_model.beats_baselines,
        "served_reference": checks_serving.served_reference, "schema_handling": checks_serving.schema_handling,
        "load_test": checks_serving.load_test, "soak": checks_serving.soak, "health": checks_serving.health,
        "reference_profile": checks_ops.reference_profile, "outcome_monitoring": checks_ops.outcome_monitoring,
        "alert_rules": checks_ops.alert_rules, "criteria": checks_ops.rollback_criteria,
        "rehearsal": checks_serving.rehearsal, "fallback_reasons": checks_serving.fallback_reasons,
        "audit_verifies": checks_serving.audit_verifies, "card_complete": checks_ops.card_complete,
        "signoffs": checks_ops.signoffs, "environment": checks_ops.environment,
    }
    phases_in_order: dict[str, list[tuple[str, str, Callable[[], ItemResult]]]] = {}
    for phase, key, title in CHECKLIST:
        phases_in_order.setdefault(phase, []).append((key, title, bind(checks[key])))
    return [Phase(name, entries) for name, entries in phases_in_order.items()]


def run(target: Target, say: Callable[[str], None] = lambda _: None,
        on_item: Callable[[ItemResult], None] | None = None) -> ReadinessReport:
    """Run the whole checklist; CannotRun when it cannot run at all."""
    started = time.time()
    ctx = Context(target, say)
    ctx.production()  # an unreachable production gateway means the run cannot judge: CannotRun now
    try:
        items = run_phases(phases(ctx), on_item=on_item, abort_on=(CannotRun,))
        context = _context(ctx)
        # maturity is about what is configured, so the rules are read even when their item was skipped
        alerts = any(i.key == "alert_rules" and i.status == "pass" for i in items) or (
            ctx.readiness.alert_rules is not None and _passes(checks_ops.alert_rules, ctx))
        level = maturity(ctx.policy, ctx.card, alerts) if ctx.card is not None else {"level": 1, "name": "ad hoc"}
    finally:
        ctx.close()
    finished = time.time()
    return ReadinessReport(
        model=target.model, version=target.version, model_sha256=ctx.model_sha256,
        policy_sha256=ctx.loaded.sha256, items=items, context=context, maturity=level,
        timings={"started": _iso(started), "finished": _iso(finished), "seconds": round(finished - started, 1)},
        figures=ctx.figures)


def _passes(check: Callable[[Context], ItemResult], ctx: Context) -> bool:
    try:
        return check(ctx).status == "pass"
    except Exception:  # the same check inside the phases reports why; here it only counts as not met
        return False


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
