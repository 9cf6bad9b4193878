"""Governance items of the readiness checklist: a complete model card and recorded sign-offs.

Sign-offs live in `signoffs.yaml` next to a version's `model.yaml`:

    signoffs:
      - name: Ada Lovelace
        role: model_owner
        when: 2026-05-01T10:00:00Z      # a timezone is required (Z or +02:00)
        decision: approve               # or reject
        note: held-out AUC 0.75 reviewed

Every role the policy requires (`readiness.required_signoffs`) must have approved, and not
rejected at or after its latest approval; a sign-off dated in the future (beyond a small clock
skew allowance) fails the item, as it cannot have happened yet.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.card import ModelCard
from gateway.yamldoc import Problem, YamlDocumentError, read_validated

#: the sign-off file's name, next to a version's model.yaml
SIGNOFF_FILE = "signoffs.yaml"

#: a sign-off dated later than this past the judging time is "in the future" (clock skew allowance)
FUTURE_SKEW = timedelta(minutes=5)


def has_heldout_metrics(card: ModelCard) -> bool:
    """The card reports a held-out evaluation: a `heldout` metrics entry, or any entry with a `split`."""
    return "heldout" in card.metrics or any(entry.get("split") for entry in card.metrics.values())


def card_problems(card: ModelCard) -> list[str]:
    """What a complete card lacks (owner, description, intended use, limitations, data, held-out
    metrics), one sentence each; empty when the card is complete."""
    problems: list[str] = []
    for field, what in (("owner", "an owner"), ("description", "a description"),
                        ("intended_use", "an intended use")):
        if not str(getattr(card, field)).strip():
            problems.append(f"{field}: the card needs {what}")
    if not any(item.strip() for item in card.limitations):
        problems.append("limitations: the card needs at least one known limitation")
    if not card.training_data.description.strip():
        problems.append("training_data.description: the card needs a description of the training data")
    if not card.training_data.sha256:
        problems.append("training_data.sha256: the card needs the training data's sha256")
    if not card.metrics:
        problems.append("metrics: the card reports no metrics")
    elif not has_heldout_metrics(card):
        problems.append("metrics: no held-out evaluation (a `heldout` entry, or an entry with a `split`)")
    return problems


class Signoff(BaseModel):
    """One person's recorded decision on a version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    """Who signed off."""
    role: str = Field(min_length=1)
    """In which capacity (e.g. `model_owner`, `risk_officer`); matched against the required roles."""
    when: datetime
    """When, with a timezone (`2026-05-01T10:00:00Z`)."""
    decision: Literal["approve", "reject"]
    """`approve` or `reject`."""
    note: str = ""
    """Free text: what was reviewed, conditions."""

    @field_validator("name", "role")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @field_validator("when")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("needs a timezone: write e.g. 2026-05-01T10:00:00Z or 2026-05-01T12:00:00+02:00")
        return value


class SignoffFile(BaseModel):
    """The content of `signoffs.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    signoffs: list[Signoff] = Field(min_length=1)
    """At least one sign-off."""


class SignoffError(Exception):
    """A sign-off file is missing, unreadable or invalid; carries positioned problems."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.describe() for p in problems))
        self.problems = problems


def read_signoffs(path: Path) -> list[Signoff]:
    """Parse and validate a sign-off file; SignoffError lists every problem with its line."""
    try:
        signoffs, _ = read_validated(path, SignoffFile, "a sign-off file")
    except YamlDocumentError as exc:
        raise SignoffError(exc.problems) from None
    return list(signoffs.signoffs)


def judge_signoffs(signoffs: list[Signoff], required_roles: list[str],
                   now: datetime) -> tuple[bool, str, dict[str, Any]]:
    """Whether every required role approved (and did not reject since), with nothing future-dated.

    Returns (ok, one-line detail, evidence). The evidence holds, per required role, its outcome
    (`approved`, `rejected` or `missing`) and who decided when (ISO 8601), plus the future-dated
    sign-offs; it does not contain `now`, so the same file gives the same evidence. A reject at
    the same instant as the role's latest approval counts as later (fail closed). A naive `now`
    is taken as UTC.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        now = now.replace(tzinfo=UTC)
    future = [s for s in signoffs if s.when > now + FUTURE_SKEW]
    current = [s for s in signoffs if s.when <= now + FUTURE_SKEW]
    roles: dict[str, dict[str, Any]] = {}
    for role in dict.fromkeys(r.strip() for r in required_roles):
        approvals = [s for s in current if s.role == role and s.decision == "approve"]
        latest = max(approvals, key=lambda s: s.when, default=None)
        rejects = [s for s in current if s.role == role and s.decision == "reject"
                   and (latest is None or s.when >= latest.when)]
        decider = max(rejects, key=lambda s: s.when) if rejects else latest
        outcome = "rejected" if rejects else "approved" if latest is not None else "missing"
        roles[role] = {"outcome": outcome, "who": decider.name if decider else None,
                       "when": decider.when.isoformat() if decider else None,
                       "note": decider.note if decider else ""}
    evidence: dict[str, Any] = {
        "required_roles": list(roles), "roles": roles, "signoffs": len(signoffs),
        "future": [{"name": s.name, "role": s.role, "when": s.when.isoformat()} for s in future],
    }
    problems: list[str] = []
    missing = [r for r, v in roles.items() if v["outcome"] == "missing"]
    if missing:
        problems.append("no approval from " + ", ".join(missing))
    problems += [f"{r} rejected ({v['who']}, {v['when']})" for r, v in roles.items() if v["outcome"] == "rejected"]
    if future:
        problems.append("dated in the future: " + ", ".join(f"{s.role} {s.name} {s.when.isoformat()}"
                                                            for s in future))
    if problems:
        return False, "; ".join(problems), evidence
    if not roles:
        return True, "no sign-offs are required", evidence
    return True, "approved by " + ", ".join(f"{r} ({v['who']}, {v['when']})" for r, v in roles.items()), evidence
