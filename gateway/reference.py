"""Markdown reference tables generated from the code (policy fields, process settings).

The README embeds them between `<!-- BEGIN name -->` / `<!-- END name -->` markers; a test fails
when they drift, and `gateway policy docs --write README.md` refreshes them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gateway.policy import (
    Audit,
    Batching,
    Breaker,
    Canary,
    Drift,
    DriftRule,
    Fairness,
    Fallback,
    FallbackRule,
    Fault,
    FeatureSpec,
    Feedback,
    Guard,
    InputSchema,
    LowConfidence,
    Policy,
    ProtectedGroup,
    Readiness,
    ReadinessData,
    RollbackCriteria,
    Rollout,
    Routing,
    Shadow,
    Slo,
    StickyKey,
    Volume,
)
from gateway.settings import Settings

POLICY_SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("(top level)", Policy),
    ("slo", Slo),
    ("schema", InputSchema),
    ("schema.features.<name>", FeatureSpec),
    ("routing", Routing),
    ("routing.canary", Canary),
    ("routing.shadow", Shadow),
    ("routing.sticky_key", StickyKey),
    ("guard", Guard),
    ("guard.breaker", Breaker),
    ("batching", Batching),
    ("fallback", Fallback),
    ("fallback.rules[]", FallbackRule),
    ("fallback.low_confidence", LowConfidence),
    ("faults[]", Fault),
    ("rollout", Rollout),
    ("rollout.rollback_if", RollbackCriteria),
    ("drift", Drift),
    ("drift.numeric / categorical / prediction", DriftRule),
    ("drift.volume", Volume),
    ("feedback", Feedback),
    ("audit", Audit),
    ("readiness", Readiness),
    ("readiness.data", ReadinessData),
    ("readiness.fairness", Fairness),
    ("readiness.fairness.groups[]", ProtectedGroup),
]


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value: Any = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    if value is None:
        return "-"
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _type(info: FieldInfo) -> str:
    text = str(info.annotation).replace("typing.", "").replace("gateway.policy.", "")
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"Annotated\[(\w+), .*\]", r"\1", text)
    text = re.sub(r"Literal\[(.*)\]", lambda m: "one of " + m.group(1).replace("'", "`"), text)
    return text.replace("|", "or").replace("NoneType", "null")


def _table(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in model.model_fields.items():
        key = info.alias or name
        doc = (info.description or "").replace("\n", " ").replace("|", "\\|")
        rows.append(f"| `{prefix}{key}` | {_type(info)} | {_default(info)} | {doc} |")
    return rows


def policy_reference() -> str:
    """The policy file reference, one table per section."""
    out: list[str] = []
    for section, model in POLICY_SECTIONS:
        out += [f"**{section}**", "", *_table(model), ""]
    return "\n".join(out).rstrip() + "\n"


def settings_reference() -> str:
    """Process settings: environment variable, command-line flag where there is one, default."""
    flags = {"host": "--host", "port": "--port", "models_dir": "--models", "policies_dir": "--policies",
             "log_level": "--log-level"}
    rows = ["| environment | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        doc = (info.description or "").replace("\n", " ")
        rows.append(f"| `GATEWAY_{name.upper()}` | {f'`{flags[name]}`' if name in flags else '-'} | "
                    f"{_default(info)} | {doc} |")
    return "\n".join(rows) + "\n"


SECTIONS = {"policy-reference": policy_reference, "settings-reference": settings_reference}


def refresh(text: str) -> str:
    """`text` with every generated section replaced by its current rendering."""
    for name, render in SECTIONS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        text = pattern.sub(lambda m, r=render: m.group(1) + r() + m.group(2), text)  # type: ignore[misc]
    return text
