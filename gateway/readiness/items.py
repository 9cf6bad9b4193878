"""The checklist's items, in order: (phase, key, title). One definition for the runner and the store.

The store refuses a report whose items are not exactly these (a one-item "ready" report made by
hand is not a checklist run); the runner binds each key to its check.
"""

from __future__ import annotations

CHECKLIST: tuple[tuple[str, str, str], ...] = (
    ("model_validation", "loads", "Model file verified against its card and loaded"),
    ("model_validation", "heldout_metric", "Held-out metric meets the policy's threshold"),
    ("model_validation", "leakage", "Time split vs random split (leakage signal)"),
    ("model_validation", "golden", "Golden examples reproduced, none regressed against stable beyond the allowance"),
    ("model_validation", "edge_inputs", "Edge and adversarial inputs answered or rejected, never a crash"),
    ("model_validation", "fairness", "Fairness across the protected groups"),
    ("model_validation", "beats_baselines", "Beats the fallback rules and the current stable"),
    ("data_pipeline", "served_reference", "Served path reproduces the reference outputs (no training-serving skew)"),
    ("data_pipeline", "schema_handling", "Schema changes handled as the policy says"),
    ("infrastructure", "load_test", "Load test at twice the peak rate meets the SLO"),
    ("infrastructure", "soak", "Memory does not grow during a soak"),
    ("infrastructure", "health", "Health and readiness answer meaningfully"),
    ("monitoring", "reference_profile", "Reference profile present and drift thresholds set"),
    ("monitoring", "outcome_monitoring", "Outcome monitoring configured"),
    ("monitoring", "alert_rules", "Alert rules with runbooks cover the model"),
    ("rollback", "criteria", "Rollback criteria defined"),
    ("rollback", "rehearsal", "Switch and rollback rehearsed under load with zero failed requests"),
    ("rollback", "fallback_reasons", "The fallback answers for every failure reason"),
    ("rollback", "audit_verifies", "The rehearsal's audit log verifies"),
    ("governance", "card_complete", "Model card complete"),
    ("governance", "signoffs", "Sign-offs recorded"),
    ("governance", "environment", "Environment matches production"),
)
