"""Governance: card completeness, the sign-off file, and judging sign-offs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.card import ModelCard, load_card
from gateway.readiness.governance import (
    SIGNOFF_FILE,
    Signoff,
    SignoffError,
    card_problems,
    judge_signoffs,
    read_signoffs,
)
from tests.conftest import MODEL, MODELS

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_card(MODELS / MODEL / "2" / "model.yaml")


def signoff(role: str, decision: str = "approve", hours_ago: float = 1.0, name: str = "Ada") -> Signoff:
    return Signoff.model_validate({"name": name, "role": role, "decision": decision,
                                   "when": NOW - timedelta(hours=hours_ago)})


# -- the card --------------------------------------------------------------------------------------

def test_the_bundled_card_is_complete(card: ModelCard) -> None:
    assert card_problems(card) == []


def test_an_incomplete_card_lists_what_it_lacks(card: ModelCard) -> None:
    bare = card.model_copy(update={"description": "", "intended_use": " ", "limitations": [],
                                   "training_data": card.training_data.model_copy(update={"description": ""}),
                                   "metrics": {}})
    problems = card_problems(bare)
    for field in ("description", "intended_use", "limitations", "training_data.description", "metrics"):
        assert any(p.startswith(f"{field}:") for p in problems), (field, problems)
    assert not any(p.startswith("owner") for p in problems)
    assert card_problems(card.model_copy(update={"owner": ""})) == ["owner: the card needs an owner"]


def test_metrics_need_a_heldout_entry(card: ModelCard) -> None:
    validation_only = card.model_copy(update={"metrics": {"validation": {"auc": 0.9}}})
    (problem,) = card_problems(validation_only)
    assert problem.startswith("metrics:") and "held-out" in problem
    with_split = card.model_copy(update={"metrics": {"latest": {"auc": 0.8, "split": "time"}}})
    assert card_problems(with_split) == []


# -- reading sign-offs -----------------------------------------------------------------------------

GOOD = """\
signoffs:
  - name: Ada Lovelace
    role: model_owner
    when: 2026-05-01T10:00:00Z
    decision: approve
    note: held-out AUC reviewed
  - name: Grace Hopper
    role: risk_officer
    when: "2026-05-01T11:30:00+02:00"
    decision: approve
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / SIGNOFF_FILE
    path.write_text(text)
    return path


def test_a_good_file_reads(tmp_path: Path) -> None:
    first, second = read_signoffs(write(tmp_path, GOOD))
    assert (first.name, first.role, first.decision, first.note) == ("Ada Lovelace", "model_owner", "approve",
                                                                    "held-out AUC reviewed")
    assert first.when == datetime(2026, 5, 1, 10, tzinfo=UTC)
    assert second.when == datetime(2026, 5, 1, 9, 30, tzinfo=UTC) and second.note == ""


@pytest.mark.parametrize(("when", "says"), [
    ("yesterday", "valid datetime"),
    ("2026-02-30T10:00:00Z", "not a valid date"),  # PyYAML's own timestamp parsing fails here
    ("2026-05-01T10:00:00", "timezone"),
    ("2026-05-01", "timezone"),
])
def test_a_wrong_date_is_reported_at_its_line(tmp_path: Path, when: str, says: str) -> None:
    path = write(tmp_path, GOOD.replace("2026-05-01T10:00:00Z", when))
    with pytest.raises(SignoffError) as caught:
        read_signoffs(path)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.path) == (str(path), 4, "signoffs[0].when")
    assert says in problem.message
    assert f"{path}:4:" in str(caught.value)


def test_other_mistakes_are_positioned_too(tmp_path: Path) -> None:
    text = GOOD.replace("decision: approve\n    note", "decision: maybe\n    note").replace("Grace Hopper", "''")
    with pytest.raises(SignoffError) as caught:
        read_signoffs(write(tmp_path, text))
    where = {p.path: p.line for p in caught.value.problems}
    assert where == {"signoffs[0].decision": 5, "signoffs[1].name": 7}
    with pytest.raises(SignoffError, match="at least 1"):
        read_signoffs(write(tmp_path, "signoffs: []\n"))
    with pytest.raises(SignoffError, match="cannot read file"):
        read_signoffs(tmp_path / "missing.yaml")


# -- judging sign-offs -----------------------------------------------------------------------------

def test_every_required_role_approved_passes() -> None:
    ok, detail, evidence = judge_signoffs([signoff("model_owner"), signoff("risk_officer", name="Grace")],
                                          ["model_owner", "risk_officer"], NOW)
    assert ok, detail
    assert detail.startswith("approved by model_owner (Ada")
    assert evidence["roles"]["risk_officer"] == {"outcome": "approved", "who": "Grace",
                                                 "when": "2026-05-01T11:00:00+00:00", "note": ""}
    assert evidence["future"] == [] and "now" not in evidence


def test_a_missing_role_fails() -> None:
    ok, detail, evidence = judge_signoffs([signoff("model_owner")], ["model_owner", "risk_officer"], NOW)
    assert not ok
    assert detail == "no approval from risk_officer"
    assert evidence["roles"]["risk_officer"] == {"outcome": "missing", "who": None, "when": None, "note": ""}


def test_a_later_reject_overrides_an_approval_and_a_later_approval_overrides_a_reject() -> None:
    approved_then_rejected = [signoff("model_owner", hours_ago=3),
                              signoff("model_owner", "reject", hours_ago=1, name="Bob")]
    ok, detail, evidence = judge_signoffs(approved_then_rejected, ["model_owner"], NOW)
    assert not ok and "model_owner rejected (Bob" in detail
    assert evidence["roles"]["model_owner"]["outcome"] == "rejected"
    rejected_then_approved = [signoff("model_owner", "reject", hours_ago=3, name="Bob"),
                              signoff("model_owner", hours_ago=1)]
    ok, _, evidence = judge_signoffs(rejected_then_approved, ["model_owner"], NOW)
    assert ok and evidence["roles"]["model_owner"]["who"] == "Ada"


def test_a_reject_by_another_role_does_not_count_against_this_one() -> None:
    ok, _, _ = judge_signoffs([signoff("model_owner"), signoff("auditor", "reject", hours_ago=0.5)],
                              ["model_owner"], NOW)
    assert ok


def test_a_future_date_fails_beyond_the_clock_skew_allowance() -> None:
    ahead = signoff("model_owner", hours_ago=-1)
    ok, detail, evidence = judge_signoffs([ahead], ["model_owner"], NOW)
    assert not ok and "dated in the future" in detail
    assert evidence["future"] == [{"name": "Ada", "role": "model_owner", "when": "2026-05-01T13:00:00+00:00"}]
    slightly_ahead = signoff("model_owner", hours_ago=-2 / 60)
    assert judge_signoffs([slightly_ahead], ["model_owner"], NOW)[0]
    # a naive `now` is taken as UTC
    assert not judge_signoffs([ahead], ["model_owner"], NOW.replace(tzinfo=None))[0]


def test_evidence_does_not_depend_on_when_it_is_judged() -> None:
    signoffs = [signoff("model_owner")]
    assert judge_signoffs(signoffs, ["model_owner"], NOW)[2] == \
        judge_signoffs(signoffs, ["model_owner"], NOW + timedelta(days=3))[2]
