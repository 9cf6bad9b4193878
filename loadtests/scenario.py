"""Scenario files: their format, validation, and the arithmetic the runner needs (no I/O to a server).

A scenario is a small YAML file in loadtests/scenarios/ (docs/loadtests.md describes every key).
Everything here is pure or file-only, so it is tested without starting a gateway.
"""

from __future__ import annotations

import copy
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
RATE = re.compile(r"\s*(?:([0-9]*\.?[0-9]+)\s*)?target\s*")
SloCheck = Literal["p99", "error_rate", "rate"]
SLO_CHECKS: tuple[SloCheck, ...] = ("p99", "error_rate", "rate")
#: admin API call of each action: method, path under /admin/models/{model}, body keys sent
ACTIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "switch": ("POST", "/switch", ("version",)),
    "rollback": ("POST", "/rollback", ("reason",)),
    "canary": ("PUT", "/canary", ("version", "percent")),
    "clear_canary": ("DELETE", "/canary", ()),
    "rollout": ("POST", "/rollout", ("version",)),
    "rollout_abort": ("POST", "/rollout/abort", ()),
}
NEEDS_VERSION = {"switch", "canary", "rollout"}
ROLLOUT_END = {"completed": "promoted", "rolled_back": "rolled_back", "aborted": "aborted"}


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the file and every problem."""


@dataclass(frozen=True)
class Phase:
    """A stretch of constant rate."""

    rate: float
    seconds: float


@dataclass(frozen=True)
class Slo:
    """What the verdict judges against (the model policy's `slo`)."""

    p99_ms: float
    error_rate: float
    peak_rps: float

    @property
    def target_rps(self) -> float:
        """Twice the expected peak: the headroom a release must show."""
        return 2 * self.peak_rps


@dataclass(frozen=True)
class TimedAction:
    """One admin call at `at` seconds after the load starts."""

    at: float
    do: str
    version: str | None = None
    percent: float | None = None
    reason: str | None = None

    def body(self) -> dict[str, Any] | None:
        """The JSON body of the admin call (None when the call takes none)."""
        keys = ACTIONS[self.do][2]
        if not keys:
            return None
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def _text(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PhaseSpec(_Strict):
    """`{rate: 120 | target | 0.5 target, seconds: 20}`."""

    rate: float | str
    seconds: float = Field(gt=0, le=3600)

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: float | str) -> float | str:
        if isinstance(value, str) and RATE.fullmatch(value) is None:
            raise ValueError(f"{value!r}: a number, `target` or `<factor> target`")
        if isinstance(value, (int, float)) and value <= 0:
            raise ValueError("must be above 0")
        return value


class ActionSpec(_Strict):
    """An admin call once (`at`) or repeatedly (`every`, from `from` until `until`)."""

    do: Literal["switch", "rollback", "canary", "clear_canary", "rollout", "rollout_abort"]
    at: float | None = Field(default=None, ge=0)
    every: float | None = Field(default=None, gt=0)
    start: float | None = Field(default=None, ge=0, alias="from")
    until: float | None = Field(default=None, gt=0)
    version: str | None = None
    versions: list[str] | None = Field(default=None, min_length=1)
    percent: float | None = Field(default=None, ge=0, le=100)
    reason: str | None = None

    _version = field_validator("version", mode="before")(_text)

    @field_validator("versions", mode="before")
    @classmethod
    def _versions(cls, value: Any) -> Any:
        return [_text(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _consistent(self) -> ActionSpec:
        if (self.at is None) == (self.every is None):
            raise ValueError("give exactly one of `at` (once) or `every` (repeated)")
        if self.every is None and (self.start is not None or self.until is not None or self.versions):
            raise ValueError("`from`, `until` and `versions` go with `every`")
        if self.version is not None and self.versions:
            raise ValueError("give `version` or `versions`, not both")
        named = self.version is not None or bool(self.versions)
        if self.do in NEEDS_VERSION and not named:
            raise ValueError(f"`{self.do}` needs a `version`")
        if self.do not in NEEDS_VERSION and named:
            raise ValueError(f"`{self.do}` takes no version")
        if (self.percent is None) != (self.do != "canary"):
            raise ValueError("`percent` goes with `canary`, and `canary` needs it")
        if self.reason is not None and self.do != "rollback":
            raise ValueError("`reason` goes with `rollback`")
        if self.start is not None and self.until is not None and self.until < self.start:
            raise ValueError("`until` is before `from`")
        return self


class RssSpec(_Strict):
    """How the server's resident memory is sampled during the run."""

    every_s: float = Field(default=2.0, ge=0.2, le=600)
    warmup_s: float = Field(default=0.0, ge=0)


class Expect(_Strict):
    """The verdict's checks beyond the policy's SLO."""

    slo: list[SloCheck] = list(SLO_CHECKS)
    max_non_2xx: int | None = Field(default=None, ge=0)
    min_fallback_share: float | None = Field(default=None, gt=0, le=1)
    max_rss_growth_pct: float | None = Field(default=None, gt=0)
    rollout: Literal["promoted", "rolled_back", "aborted"] | None = None


class Scenario(_Strict):
    """A whole scenario file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    model: str = Field(min_length=1)
    protocol: Literal["v1", "v2"] = "v1"
    phases: list[PhaseSpec] = Field(min_length=1)
    actions: list[ActionSpec] = []
    policy_overrides: dict[str, Any] = {}
    rss: RssSpec = RssSpec()
    expect: Expect = Expect()

    @property
    def seconds(self) -> float:
        """Unscaled length of the load."""
        return sum(p.seconds for p in self.phases)

    @model_validator(mode="after")
    def _within_the_run(self) -> Scenario:
        for i, action in enumerate(self.actions):
            first = action.at if action.at is not None else (action.start if action.start is not None
                                                             else action.every)
            if first is not None and first >= self.seconds:
                raise ValueError(f"actions.{i}: starts at {first} s, after the load ends ({self.seconds} s)")
        if "model" in self.policy_overrides:
            raise ValueError("policy_overrides: the model's name cannot be overridden")
        if self.expect.rollout is not None and not any(a.do == "rollout" for a in self.actions):
            raise ValueError("expect.rollout needs an action `do: rollout`")
        return self


def parse_rate(text: str | float, slo: Slo) -> float:
    """`120`, `target`, `0.5 target` -> requests per second."""
    if isinstance(text, (int, float)):
        return float(text)
    match = RATE.fullmatch(str(text))
    if match is None:
        raise ValueError(f"rate {text!r}: a number, `target` or `<factor> target`")
    return float(match.group(1) or 1.0) * slo.target_rps


def schedule(phases: list[Phase]) -> list[float]:
    """Send offsets in seconds for a sequence of constant-rate phases."""
    offsets: list[float] = []
    start = 0.0
    for phase in phases:
        count = round(phase.rate * phase.seconds)
        offsets += [start + i / phase.rate for i in range(count)]
        start += phase.seconds
    return offsets


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append(f"{where}: {message.removeprefix('Value error, ')}")
    return "; ".join(problems)


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    """Validate a scenario's YAML data, or raise ScenarioError naming every problem."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a mapping of keys (name, model, phases, ...) expected")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{source}: {_describe(exc)}") from None


def read_scenario(path: Path) -> Scenario:
    """Read and validate one scenario file."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return parse_scenario(data, str(path))


def find_scenario(name_or_path: str) -> Path:
    """A path as given, or a bundled scenario by name (`steady` -> loadtests/scenarios/steady.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = SCENARIOS / f"{name_or_path}.yaml"
    if "/" not in name_or_path and bundled.is_file():
        return bundled
    known = ", ".join(p.stem for p in sorted(SCENARIOS.glob("*.yaml")))
    raise ScenarioError(f"no scenario file {name_or_path!r} (bundled: {known})")


def phases_of(scenario: Scenario, slo: Slo, scale: float = 1.0, rate_scale: float = 1.0) -> list[Phase]:
    """The phases with rates resolved against the SLO and durations scaled."""
    return [Phase(parse_rate(p.rate, slo) * rate_scale, p.seconds * scale) for p in scenario.phases]


def timed_actions(scenario: Scenario, scale: float = 1.0) -> list[TimedAction]:
    """Every admin call with its (scaled) time, in time order; `every` series stop at `until` or the end."""
    end = scenario.seconds
    timed: list[TimedAction] = []
    for action in scenario.actions:
        if action.at is not None:
            times = [action.at]
        else:
            assert action.every is not None
            first = action.start if action.start is not None else action.every
            last = action.until if action.until is not None else end
            count = int((last - first) / action.every + 1e-9) + 1
            times = [t for t in (first + k * action.every for k in range(count)) if t < end]
        for k, at in enumerate(times):
            version = action.versions[k % len(action.versions)] if action.versions else action.version
            timed.append(TimedAction(round(at * scale, 6), action.do, version, action.percent, action.reason))
    return sorted(timed, key=lambda a: a.at)


def deep_merge(base: Any, overrides: Any) -> Any:
    """`overrides` laid over `base`: mappings merge key by key, anything else (lists too) replaces."""
    if isinstance(base, dict) and isinstance(overrides, dict):
        merged = dict(base)
        for key, value in overrides.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(overrides)


def write_policies(scenario: Scenario, source: Path, target: Path) -> Path:
    """Copy the policies directory `source` to `target` with the scenario's overrides merged into its model's
    policy; the merged policy is validated by the gateway's own loader. Returns the merged file."""
    from gateway.policy import PolicyError, load_policy

    shutil.copytree(source, target, dirs_exist_ok=True)
    path = target / f"{scenario.model}.yaml"
    if not path.is_file():
        raise ScenarioError(f"no policy {path.name} in {source} to apply policy_overrides to")
    merged = deep_merge(yaml.safe_load(path.read_text()), scenario.policy_overrides)
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    try:
        load_policy(path)
    except PolicyError as exc:
        raise ScenarioError(f"scenario {scenario.name}: policy_overrides give an invalid policy: {exc}") from None
    return path


def rss_report(samples: list[tuple[float, int]], warmup_s: float = 0.0) -> dict[str, Any]:
    """Start (first sample at or after the warm-up), end, max and growth of resident memory.

    `samples` are (seconds since the load started, bytes). Growth is end minus start, in MB
    (2**20 bytes) and in percent of start; with no samples every figure is None.
    """
    if not samples:
        return {"samples": 0, "start_mb": None, "end_mb": None, "max_mb": None, "growth_mb": None,
                "growth_pct": None}
    ordered = sorted(samples)
    after = [s for s in ordered if s[0] >= warmup_s] or ordered[-1:]
    start, end = after[0][1], after[-1][1]
    mb = 2**20
    return {"samples": len(ordered), "start_mb": round(start / mb, 2), "end_mb": round(end / mb, 2),
            "max_mb": round(max(b for _, b in after) / mb, 2), "growth_mb": round((end - start) / mb, 2),
            "growth_pct": round((end - start) / start * 100, 2) if start else None,
            "baseline_at_s": round(after[0][0], 2)}


def parse_rss(metrics_text: str) -> int | None:
    """`process_resident_memory_bytes` from Prometheus text, or None when the server does not export it."""
    match = re.search(r"^process_resident_memory_bytes(?:\{[^}]*\})?\s+(\S+)", metrics_text, re.MULTILINE)
    return int(float(match.group(1))) if match else None


def rollout_outcome(status: dict[str, Any] | None) -> str:
    """The rollout's end state as the scenario names it (`promoted`, `rolled_back`, ...), or its live status."""
    if status is None:
        return "none"
    raw = str(status.get("status"))
    return ROLLOUT_END.get(raw, raw)


def shares_over_time(timeline: dict[tuple[int, str], int], bucket_s: float = 1.0) -> list[dict[str, Any]]:
    """Answer shares by version per time bucket: [{"t": bucket start in s, "answers", "shares": {version: share}}]."""
    seconds: dict[int, dict[str, int]] = {}
    for (second, version), count in timeline.items():
        seconds.setdefault(second, {})[version] = seconds.get(second, {}).get(version, 0) + count
    rows = []
    for second in sorted(seconds):
        counts = seconds[second]
        total = sum(counts.values())
        rows.append({"t": round(second * bucket_s, 3), "answers": total,
                     "shares": {v: round(n / total, 4) for v, n in sorted(counts.items())}})
    return rows
