"""`gateway policy check`: a policy file against the schema and against the model repository."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.card import CardError, find_card, load_card
from gateway.policy import PolicyError, load_policy
from gateway.policy_fit import policy_misfits
from gateway.repository import ModelRepository
from gateway.runtime import RuntimeOptions
from gateway.yamldoc import Problem


@dataclass
class CheckReport:
    """Problems (errors) and warnings found in one policy file."""

    file: str
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No errors (warnings do not fail a check)."""
        return not self.errors


def check_policy_file(path: Path, models_dir: Path) -> CheckReport:
    """Validate one file against the schema, then against every version of its model."""
    report = CheckReport(str(path))
    try:
        loaded = load_policy(path)
    except PolicyError as exc:
        report.errors += exc.problems
        return report
    doc = loaded.document
    assert doc is not None
    policy = loaded.policy
    versions = ModelRepository(models_dir, RuntimeOptions()).discover().get(policy.model)
    if not versions:
        report.errors.append(doc.problem(("model",), f"model {policy.model!r} is not in the model repository "
                                                     f"{models_dir} (no {policy.model}/<version>/model.onnx)"))
        return report
    stable = policy.routing.stable
    if stable is not None and stable not in versions:
        report.errors.append(doc.problem(("routing", "stable"), f"version {stable!r} is not in the repository; "
                                                                f"versions: {versions}"))
    grouped: dict[tuple[tuple[str | int, ...], str, bool], list[str]] = {}
    for version in versions:
        card_path = find_card(models_dir / policy.model / version)
        if card_path is None:
            report.warnings.append(doc.problem(("model",), f"version {version} has no model card; "
                                                           "its signature cannot be checked"))
            continue
        try:
            card = load_card(card_path)
        except CardError as exc:
            report.warnings.append(doc.problem(("model",), f"version {version} has an invalid card: {exc}"))
            continue
        for misfit in policy_misfits(policy, card.signature, card.score):
            grouped.setdefault((misfit.loc, misfit.message, misfit.error), []).append(version)
    for (loc, message, is_error), where in grouped.items():
        label = "version" if len(where) == 1 else "versions"
        problem = doc.problem(loc, f"{message} ({label} {', '.join(where)})")
        (report.errors if is_error else report.warnings).append(problem)
    return report
