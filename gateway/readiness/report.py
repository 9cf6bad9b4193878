"""The readiness checklist's results: items with evidence, phases that gate each other, the score.

Phases run in order, as in a formal sign-off: once a phase has a failed item, the items of the
later phases are recorded as `skipped` (they count as not passed: a release cannot earn points
it never showed). The score is the share of applicable items that passed; items that do not
apply to this model (`not_applicable`) are left out of it. The report is content-addressed:
its sha256 covers everything but timings, so the same inputs give the same address.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import orjson

Status = Literal["pass", "fail", "not_applicable", "skipped"]
Band = Literal["delay", "launch_with_extra_monitoring", "ready"]

#: the checklist's phases, in the order they run and gate each other
PHASES = ("model_validation", "data_pipeline", "infrastructure", "monitoring", "rollback", "governance")

#: below this share of applicable items passed: delay the launch
DELAY_BELOW = 0.80
#: above this share: ready; in between, launch only with extra monitoring and a rehearsed rollback
READY_ABOVE = 0.95


#: item fields the content address leaves out: measurements vary from run to run, and the detail is
#: prose written from the evidence and the measurements (a p99 in a pass line must not move the address)
_UNADDRESSED = frozenset({"seconds", "measured", "detail"})


@dataclass(frozen=True)
class ItemResult:
    """One checklist item's outcome and the evidence behind it."""

    phase: str
    key: str
    """Stable identifier, e.g. `heldout_metric`."""
    title: str
    status: Status
    detail: str = ""
    """One line a person reads: why it passed or failed (outside the address: it may quote measurements)."""
    evidence: dict[str, Any] = field(default_factory=dict)
    """Figures and facts (JSON-ready) the verdict rests on."""
    measured: dict[str, Any] = field(default_factory=dict)
    """Measurements that vary run to run (latencies, memory, durations): left out of the address."""
    seconds: float = 0.0
    """How long the check took (left out of the content address)."""


#: a check: returns its result (it may raise; the runner records that as a failure with the error)
Check = Callable[[], ItemResult]


@dataclass(frozen=True)
class Phase:
    """A named group of checks; a failure in it skips every later phase."""

    name: str
    checks: Sequence[tuple[str, str, Check]]
    """(key, title, check) in the order they run."""


def run_phases(phases: Sequence[Phase], clock: Callable[[], float] = time.perf_counter,
               on_item: Callable[[ItemResult], None] | None = None,
               abort_on: tuple[type[Exception], ...] = ()) -> list[ItemResult]:
    """Run every check in order; after a phase with a failure, the rest are `skipped`.

    A check raising one of `abort_on` stops the whole run (the exception propagates): it says the
    run cannot judge anything, as opposed to this item failing.
    """
    results: list[ItemResult] = []
    failed_phase: str | None = None
    for phase in phases:
        for key, title, check in phase.checks:
            if failed_phase is not None:
                item = ItemResult(phase.name, key, title, "skipped", f"not run: phase {failed_phase} failed")
            else:
                started = clock()
                try:
                    item = check()
                except abort_on:
                    raise
                except Exception as exc:  # a check that cannot run is a failed check, with the reason
                    item = ItemResult(phase.name, key, title, "fail", f"the check could not run: {exc}",
                                      {"error": type(exc).__name__})
                item = replace(item, phase=phase.name, key=key, title=title, seconds=round(clock() - started, 3))
            results.append(item)
            if on_item is not None:
                on_item(item)
        if failed_phase is None and any(r.status == "fail" for r in results if r.phase == phase.name):
            failed_phase = phase.name
    return results


def score(items: Sequence[ItemResult]) -> float:
    """Share of applicable items that passed (skipped ones count as not passed); 0 with none."""
    applicable = [i for i in items if i.status != "not_applicable"]
    if not applicable:
        return 0.0
    return sum(i.status == "pass" for i in applicable) / len(applicable)


def band(value: float) -> Band:
    """What the score allows: delay (< 80 %), launch with extra monitoring (80-95 %), ready (> 95 %)."""
    if value < DELAY_BELOW:
        return "delay"
    if value <= READY_ABOVE:
        return "launch_with_extra_monitoring"
    return "ready"


#: the top-level keys of a report's JSON form that its address covers
CONTENT_KEYS = ("model", "version", "model_sha256", "policy_sha256", "context", "items", "score", "band", "ready",
                "maturity")


def content_address(content: dict[str, Any]) -> str:
    """sha256 of a report's content (the CONTENT_KEYS part of its JSON form), keys sorted."""
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def address_of(report: dict[str, Any]) -> str:
    """Recompute the address of a report's JSON form (e.g. one read back from a file or upload).

    Item fields outside the address (timings, measurements) are dropped first, so a report whose
    address matches its `sha256` has not been changed where it counts.
    """
    content = {key: report.get(key) for key in CONTENT_KEYS}
    items = content.get("items")
    if isinstance(items, list):
        content["items"] = [{k: v for k, v in i.items() if k not in _UNADDRESSED} if isinstance(i, dict) else i
                            for i in items]
    return content_address(content)


@dataclass
class ReadinessReport:
    """The whole run: what was checked, against which files, with what outcome."""

    model: str
    version: str
    model_sha256: str
    policy_sha256: str
    items: list[ItemResult]
    context: dict[str, Any] = field(default_factory=dict)
    """Inputs that shaped the run (data files and their hashes, settings), for the address."""
    timings: dict[str, Any] = field(default_factory=dict)
    """When it ran and how long it took (left out of the address)."""
    maturity: dict[str, Any] = field(default_factory=dict)
    """The deployment's maturity level (1 ad hoc .. 5 self-healing) and what it rests on."""
    figures: list[dict[str, Any]] = field(default_factory=list)
    """Plot data for the HTML page (left out of the address: some are measurements)."""

    @property
    def score(self) -> float:
        """Share of applicable items passed."""
        return score(self.items)

    @property
    def band(self) -> Band:
        """What the score allows."""
        return band(self.score)

    @property
    def ready(self) -> bool:
        """Ready to take traffic: the top band, with no failed or skipped item."""
        return self.band == "ready" and all(i.status in ("pass", "not_applicable") for i in self.items)

    def content(self) -> dict[str, Any]:
        """Everything but timings, as plain JSON data (what the address covers)."""
        return {
            "model": self.model, "version": self.version, "model_sha256": self.model_sha256,
            "policy_sha256": self.policy_sha256, "context": self.context,
            "items": [{k: v for k, v in asdict(i).items() if k not in _UNADDRESSED} for i in self.items],
            "score": round(self.score, 6), "band": self.band, "ready": self.ready, "maturity": self.maturity,
        }

    @property
    def sha256(self) -> str:
        """The report's content address."""
        return content_address(self.content())

    def as_json(self) -> dict[str, Any]:
        """The full report: content, address and timings."""
        items = [{k: v for k, v in asdict(i).items() if k not in ("seconds", "measured")} for i in self.items]
        return {**self.content(), "items": items, "sha256": self.sha256, "timings": self.timings,
                "measured": {f"{i.phase}.{i.key}": i.measured for i in self.items if i.measured},
                "seconds": {f"{i.phase}.{i.key}": i.seconds for i in self.items},
                "figures": self.figures}
