"""The policy schema: the single source of truth for what a model owner may declare.

Policies are frozen pydantic models that forbid unknown keys; `policies/policy.schema.json` is
generated from `Policy` (`gateway policy schema`) so editors can validate YAML as it is typed.
Every field's docstring is its reference documentation.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from gateway.rules import Kind, RuleError, check_condition, parse_condition
from gateway.yamldoc import Problem, YamlDocument, YamlDocumentError, read_validated

FeatureType = Literal["float", "int", "bool", "category", "string"]
_RULE_KINDS: dict[str, Kind] = {"float": "number", "int": "number", "bool": "bool", "category": "string",
                                "string": "string"}
Scalar = float | int | bool | str


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class FeatureSpec(_Policy):
    """Constraints on one input feature (one named column of a tabular request)."""

    type: FeatureType
    """Value type: `float`, `int`, `bool`, `category` (one of `values`) or `string`."""
    description: str = ""
    """What the feature means, for people reading the policy."""
    required: bool = True
    """A request without this feature is rejected. If false, a missing feature takes `default` (or null)."""
    nullable: bool = False
    """Null values are accepted (replaced by `default`, or NaN for float model inputs)."""
    default: Scalar | None = None
    """Value used for nulls and for a missing, not required, feature."""
    min: float | None = None
    """Smallest allowed value (inclusive), for `float` and `int`."""
    max: float | None = None
    """Largest allowed value (inclusive), for `float` and `int`."""
    values: list[str] | None = None
    """The allowed values of a `category` feature."""
    max_length: int | None = Field(default=None, ge=1)
    """Longest allowed string, for `string` and `category`."""
    allow_nan: bool = False
    """NaN is accepted (as a JSON `NaN` literal or binary data) for `float` features."""
    allow_inf: bool = False
    """Positive and negative infinity are accepted for `float` features."""
    input: str | None = None
    """Name of the model input this feature feeds, when it differs from the feature's name."""

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        numeric = self.type in ("float", "int")
        if (self.min is not None or self.max is not None) and not numeric:
            raise ValueError(f"min/max apply to float and int features, not {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if self.type == "category" and not self.values:
            raise ValueError("a category feature needs a non-empty `values` list")
        if self.values is not None and self.type != "category":
            raise ValueError(f"`values` applies to category features, not {self.type}")
        if self.values is not None and len(set(self.values)) != len(self.values):
            raise ValueError("`values` lists a value twice")
        if (self.allow_nan or self.allow_inf) and self.type != "float":
            raise ValueError("allow_nan/allow_inf apply to float features only")
        if self.default is not None:
            problem = self.check_value(self.default)
            if problem:
                raise ValueError(f"default {self.default!r} is not a valid value: {problem}")
        return self

    def check_value(self, value: Scalar) -> str | None:
        """Why a single scalar breaks this spec, or None (used for defaults and fallback outputs)."""
        if self.type in ("float", "int"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"expected a number, got {type(value).__name__}"
            if self.type == "int" and not float(value).is_integer():
                return "expected an integer"
            if math.isnan(value) or math.isinf(value):
                return "not finite"
            if self.min is not None and value < self.min:
                return f"below min {self.min}"
            if self.max is not None and value > self.max:
                return f"above max {self.max}"
            return None
        if self.type == "bool":
            return None if isinstance(value, bool) else "expected true or false"
        if not isinstance(value, str):
            return "expected a string"
        if self.values is not None and value not in self.values:
            return f"not one of {self.values}"
        if self.max_length is not None and len(value) > self.max_length:
            return f"longer than {self.max_length}"
        return None


class InputSchema(_Policy):
    """What a valid request looks like."""

    features: dict[str, FeatureSpec]
    """Per feature (request field name) its constraints."""
    unknown_fields: Literal["ignore", "reject"] = "ignore"
    """Fields the schema does not name: `ignore` (dropped and counted) or `reject` (422)."""
    max_batch_size: int = Field(default=1024, ge=1)
    """Most rows one request may carry; larger batches are rejected with 422."""

    @model_validator(mode="after")
    def _inputs_unique(self) -> InputSchema:
        seen: dict[str, str] = {}
        for name, spec in self.features.items():
            target = spec.input or name
            if target in seen:
                raise ValueError(f"features {seen[target]!r} and {name!r} both feed model input {target!r}")
            seen[target] = name
        return self


class Slo(_Policy):
    """Service-level objectives; load tests and readiness checks judge against them."""

    p99_ms: float = Field(default=100.0, gt=0)
    """99th-percentile latency target in milliseconds."""
    error_rate: float = Field(default=0.01, ge=0, le=1)
    """Largest acceptable share of non-2xx answers."""
    peak_rps: float = Field(default=100.0, gt=0)
    """Expected peak requests per second; load tests target twice this."""


VersionName = Annotated[str, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]})]


def _version_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class StickyKey(_Policy):
    """What keeps one caller on one version during a canary: a request header or an input field."""

    header: str | None = None
    """Header whose value is hashed (e.g. `X-Customer-Id`)."""
    field: str | None = None
    """Request field whose value (first row) is hashed (e.g. `customer_id`); it need not be a feature."""

    @model_validator(mode="after")
    def _exactly_one(self) -> StickyKey:
        if (self.header is None) == (self.field is None):
            raise ValueError("give exactly one of `header` or `field`")
        return self


class Canary(_Policy):
    """A version that gets a share of unversioned traffic next to stable."""

    version: VersionName
    """The canary version."""
    percent: float = Field(ge=0, le=100)
    """Share of traffic (by sticky key when one is set), in percent."""

    _text = field_validator("version", mode="before")(_version_text)


class Shadow(_Policy):
    """A version that sees a copy of sampled requests; its answers are compared, never returned."""

    version: VersionName
    """The shadow version."""
    percent: float = Field(default=100.0, ge=0, le=100)
    """Share of answered requests mirrored to the shadow, in percent."""

    _text = field_validator("version", mode="before")(_version_text)


class Routing(_Policy):
    """Desired routing. Switches, rollbacks and rollouts then change the effective routing (see README)."""

    stable: Annotated[str | None, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"},
                                                            {"type": "null"}]})] = None
    """The version unversioned requests go to; by default the highest loaded version number."""
    canary: Canary | None = None
    """Optional canary version and its share of traffic."""
    shadow: Shadow | None = None
    """Optional shadow version and the share of requests mirrored to it."""
    sticky_key: StickyKey | None = None
    """Keeps each caller on one version during a canary (otherwise the split is per request)."""
    shadow_queue: int = Field(default=100, ge=1, le=100_000)
    """Mirrored requests waiting for the shadow; when full, new ones are dropped and counted."""

    _text = field_validator("stable", mode="before")(_version_text)


class RollbackCriteria(_Policy):
    """When a canary is worse than allowed; each is judged once `min_requests` is reached."""

    error_rate_gt: float | None = Field(default=0.02, ge=0, le=1)
    """Share of the canary's calls that failed (timeouts, runtime errors, open breaker)."""
    p99_ms_gt: float | None = Field(default=None, gt=0)
    """The canary's p99 latency in milliseconds."""
    p99_ratio_gt: float | None = Field(default=2.0, gt=0)
    """The canary's p99 latency over stable's in the same interval."""
    fallback_rate_gt: float | None = Field(default=0.05, ge=0, le=1)
    """Share of the canary's answers that came from the fallback rules."""
    shadow_disagreement_gt: float | None = Field(default=None, ge=0, le=1)
    """Label disagreement between the canary as shadow and the primary (needs a shadow on the canary)."""
    drift_alert: bool = True
    """Roll back when any of the canary's features (or its score) is in drift `alert`."""


class Rollout(_Policy):
    """The plan `gateway rollout start` follows."""

    steps: list[float] = Field(default=[1.0, 10.0, 50.0, 100.0], min_length=1)
    """Canary traffic percentages, increasing, ending at 100 (then the canary becomes stable)."""
    interval_s: float = Field(default=60.0, gt=0, le=86_400)
    """Time at each step before the canary is judged."""
    min_requests: int = Field(default=50, ge=1)
    """Canary calls needed in a step before it can pass; a breach needs this many too."""
    rollback_if: RollbackCriteria = RollbackCriteria()
    """Criteria that roll the canary back at once."""

    @field_validator("steps")
    @classmethod
    def _increasing_to_100(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError("every step is a percentage in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must increase")
        if steps[-1] != 100:
            raise ValueError("the last step must be 100")
        return steps


class Breaker(_Policy):
    """Per-version circuit breaker: trips after `fail_max` consecutive failures."""

    fail_max: int = Field(default=5, ge=1, le=10_000)
    """Consecutive failures (timeouts, runtime errors) that open the breaker."""
    reset_timeout_s: float = Field(default=30.0, gt=0, le=86_400)
    """Seconds an open breaker waits before letting one trial request through (half-open)."""


class Guard(_Policy):
    """Deadline and circuit breaker around every model call."""

    timeout_ms: float = Field(default=1000.0, gt=0, le=600_000)
    """Deadline per request, from arrival to answer; clients may ask for less, never more."""
    breaker: Breaker = Breaker()
    """The circuit breaker each version of the model gets."""
    execution: Literal["auto", "inline", "thread"] = "auto"
    """Where a version's model runs: `inline` on the event loop (no thread hop; requests of one
    loop turn share a run; a watchdog thread terminates a run that overruns the deadline),
    `thread` on the worker pool, or `auto`: inline when the version's single-row run measured at
    warm-up takes at most 0.25 ms, else thread. Versions with fault injection always use the pool.
    `batching` applies either way (its batches run where the version runs)."""


class Batching(_Policy):
    """Dynamic batching: concurrent requests to one version share one onnxruntime call."""

    max_batch_size: int = Field(default=32, ge=1, le=65_536)
    """Most rows in one batch (a single larger request runs alone)."""
    max_queue_delay_ms: float = Field(default=1.0, ge=0, le=1000)
    """How long the first request of a batch waits for batch-mates while the pool has room; 0 runs at
    once and batches only what arrives while earlier batches run."""
    max_concurrent_batches: int = Field(default=1, ge=1, le=64)
    """Batches of one version running at once (bounded by GATEWAY_INFERENCE_THREADS too); further
    closed batches wait for a running one to finish, gathering more rows meanwhile."""


class FallbackRule(_Policy):
    """One rule: when the condition holds for a row, answer that row with `output`."""

    name: str | None = None
    """Label reported in answers and metrics (default: `rules[i]`)."""
    when: str = Field(min_length=1)
    """Condition in the rule language (see README), e.g. `income < 10000 or delinquencies_2y >= 3`."""
    output: dict[str, Any]
    """Value of every model output for a matching row (per-row shape: a scalar, or a list)."""

    @field_validator("when")
    @classmethod
    def _parses(cls, value: str) -> str:
        parse_condition(value)  # RuleError is a ValueError: pydantic reports it at this field
        return value


class LowConfidence(_Policy):
    """Model answers whose score falls inside a band are not trusted as they are."""

    band: tuple[float, float]
    """Inclusive [low, high] range of the model's score (the card's `score` output element)."""
    action: Literal["fallback", "review"] = "review"
    """`fallback`: such rows get the fallback rules' answer; `review`: kept, and marked for human review."""

    @model_validator(mode="after")
    def _ordered(self) -> LowConfidence:
        if self.band[0] > self.band[1]:
            raise ValueError(f"band low {self.band[0]} is above high {self.band[1]}")
        return self


class Fallback(_Policy):
    """Rule-based answers for when no model version can answer (or should not be trusted)."""

    rules: list[FallbackRule] = []
    """Ordered rules; the first whose condition holds answers a row."""
    default: dict[str, Any]
    """Outputs for rows no rule matches."""
    low_confidence: LowConfidence | None = None
    """Optional band of model scores to send to the fallback or to mark for review."""


class Fault(_Policy):
    """Injected faults for one version (rehearsal only; the server needs GATEWAY_ALLOW_FAULT_INJECTION)."""

    version: VersionName
    """The version whose calls are disturbed."""
    delay_ms: float = Field(default=0.0, ge=0, le=600_000)
    """Extra time a delayed call takes (the deadline still applies)."""
    delay_percent: float = Field(default=0.0, ge=0, le=100)
    """Share of calls that are delayed, in percent."""
    error_percent: float = Field(default=0.0, ge=0, le=100)
    """Share of calls that fail with an injected runtime error, in percent."""

    _text = field_validator("version", mode="before")(_version_text)


class DriftRule(_Policy):
    """Which score decides a drift state, and its thresholds."""

    metric: Literal["psi", "ks", "js", "chi2_p"] = "psi"
    """`psi`, `ks` (numeric only), `js`, or `chi2_p` (categorical only; low p means drift)."""
    warn: float = Field(default=0.1, ge=0)
    """Score at which the state is `warn` (for `chi2_p`: p-value at or below)."""
    alert: float = Field(default=0.25, ge=0)
    """Score at which the state is `alert` (for `chi2_p`: p-value at or below)."""

    @model_validator(mode="after")
    def _ordered(self) -> DriftRule:
        if self.metric == "chi2_p" and self.alert > self.warn:
            raise ValueError("for chi2_p, alert is a smaller p-value than warn")
        if self.metric != "chi2_p" and self.alert < self.warn:
            raise ValueError("alert must be at least warn")
        return self


class Volume(_Policy):
    """Expected requests per minute for the model as a whole (every replica and worker together: the
    bundled alert judges the sum); outside the band is an anomaly."""

    min_per_minute: float | None = Field(default=None, ge=0)
    """Fewer requests than this in the last full minute is an anomaly."""
    max_per_minute: float | None = Field(default=None, ge=0)
    """More requests than this in the last full minute is an anomaly."""


class Drift(_Policy):
    """Online drift of inputs and of the prediction score against the card's reference profile."""

    window: int = Field(default=5000, ge=10, le=10_000_000)
    """Rows in the sliding window (per version); older rows age out a sub-window at a time."""
    sub_windows: int = Field(default=10, ge=1, le=1000)
    """How many pieces the window is kept in (ageing granularity)."""
    min_rows: int = Field(default=500, ge=1)
    """Fewer rows than this in the window: state `insufficient`, no score."""
    numeric: DriftRule = DriftRule()
    """Rule for numeric features."""
    categorical: DriftRule = DriftRule()
    """Rule for categorical features."""
    prediction: DriftRule = DriftRule()
    """Rule for the prediction score."""
    missing_rate_alert: float = Field(default=0.2, ge=0, le=1)
    """Missing-value rate above the reference's by more than this: alert."""
    unseen_rate_alert: float = Field(default=0.05, ge=0, le=1)
    """Share of unseen categories (or out-of-range numbers) above this: alert."""
    queue: int = Field(default=1000, ge=1, le=1_000_000)
    """Batches waiting to be folded into the window; when full, new ones are dropped and counted."""
    score_every_s: float = Field(default=2.0, gt=0, le=3600)
    """Scores are recomputed at most this often (not per request)."""
    volume: Volume = Volume()
    """Expected request volume."""

    @model_validator(mode="after")
    def _fits(self) -> Drift:
        if self.window % self.sub_windows:
            raise ValueError(f"window ({self.window}) must be a multiple of sub_windows ({self.sub_windows})")
        if self.min_rows > self.window:
            raise ValueError(f"min_rows ({self.min_rows}) is more than the window holds ({self.window})")
        for kind, rule in (("numeric", self.numeric), ("prediction", self.prediction)):
            if rule.metric == "chi2_p":
                raise ValueError(f"drift.{kind}.metric: chi2_p is for categorical features")
        if self.categorical.metric == "ks":
            raise ValueError("drift.categorical.metric: ks is for numeric features")
        return self


class Feedback(_Policy):
    """Delayed true labels, joined to predictions by request id."""

    store: int = Field(default=10_000, ge=1, le=10_000_000)
    """Recent predictions kept for joining; older ones expire (their feedback is reported back)."""
    window: int = Field(default=1000, ge=10, le=1_000_000)
    """Labelled rows per version the online metrics are computed over."""
    min_labels: int = Field(default=100, ge=1)
    """Fewer labelled rows: state `insufficient`."""
    accuracy_below: float | None = Field(default=None, ge=0, le=1)
    """Online accuracy below this: alert."""
    auc_below: float | None = Field(default=None, ge=0, le=1)
    """Online AUC below this: alert."""
    brier_above: float | None = Field(default=None, ge=0, le=1)
    """Online Brier score above this: alert."""


class Audit(_Policy):
    """What the tamper-evident audit log records for this model, and what happens when it falls behind."""

    enabled: bool = True
    """Write a record per answered request (model, fallback and shadow answers)."""
    redact: dict[str, Literal["drop", "mask", "hash"]] = {}
    """Per request field: `drop` (left out), `mask` (kept as `***`), `hash` (HMAC-SHA256 with the
    server's GATEWAY_AUDIT_HMAC_KEY: equal values stay joinable without being readable)."""
    on_full: Literal["block", "reject", "drop"] = "block"
    """When the writer's queue is full: `block` (the request waits: backpressure), `reject` (503 to
    the client, nothing answered unrecorded), or `drop` (answered, the record is dropped and counted)."""


class ProtectedGroup(_Policy):
    """A column of the model's data whose groups must be treated alike (e.g. `gender`, or `age` in bands)."""

    column: str = Field(min_length=1)
    """Column of the data files (it need not be a model input)."""
    bins: list[float] | None = None
    """Cut a numeric column into bands at these ascending edges (e.g. [25, 62]: <25, 25-62, >=62)."""
    min_rows: int = Field(default=30, ge=1)
    """Groups with fewer held-out rows than this are reported but not judged (too few to tell)."""

    @model_validator(mode="after")
    def _ascending(self) -> ProtectedGroup:
        if self.bins is not None and (not self.bins or any(b <= a for a, b in zip(self.bins, self.bins[1:],
                                                                                  strict=False))):
            raise ValueError("bins must be a non-empty list of strictly ascending edges")
        return self


class Fairness(_Policy):
    """Fairness bounds across the protected groups, judged on the held-out data."""

    groups: list[ProtectedGroup] = []
    """The protected groups; none: the fairness item does not apply."""
    decision_threshold: float | None = Field(default=None, ge=0, le=1)
    """A row is a positive decision when its score is at least this; unset: when the label output
    equals the card's `score.positive_label`."""
    favourable: Literal["positive", "negative"] = "positive"
    """Which decision is the favourable one for the person (e.g. `negative` when positive means
    "predicted to default"): the rate ratio compares how often each group gets it."""
    min_positive_rate_ratio: float = Field(default=0.8, ge=0, le=1)
    """Lowest group rate of the favourable decision over the highest (the four-fifths rule: 0.8)."""
    max_tpr_gap: float = Field(default=0.1, ge=0, le=1)
    """Largest difference in true-positive rate between groups (equal opportunity)."""


class ReadinessData(_Policy):
    """The model's data files, under `models/<name>/<data dir>/`."""

    dir: str = "data"
    """Directory of the model (next to its versions) holding the files below."""
    heldout: str = "heldout.csv"
    """Held-out rows never trained on: the latest ones (a time-based split), with the label."""
    rows: str | None = "applications.csv"
    """Every row (training and held-out) the random split is drawn from; unset: no leakage check."""
    golden: str = "golden.jsonl"
    """Golden examples per version (`id`, `inputs`, `outputs`, `version`)."""
    label: str | None = None
    """Column with the true outcome; unset: the card's `training_data.label`."""
    time_column: str | None = None
    """Column the time-based split is ordered by (reported only)."""
    random_seed: int = 0
    """Seed of the random split, so the same inputs give the same report."""


class Readiness(_Policy):
    """The release readiness checklist's thresholds, and whether promotion requires a passing report."""

    gate: Literal["enforce", "off"] = "enforce"
    """`enforce`: a switch to, or a rollout of, a version needs a passing report for that model file
    and this policy (an admin may force it, audited); `off`: reports are advisory."""

    @field_validator("gate", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false (and `on` as true): take them as meant
        return {False: "off", True: "enforce"}.get(value, value) if isinstance(value, bool) else value
    data: ReadinessData = ReadinessData()
    """Where the model's data is."""
    metric: Literal["auc", "accuracy", "brier", "log_loss"] = "auc"
    """The held-out metric judged (auc and accuracy: higher is better; brier and log_loss: lower)."""
    threshold: float = Field(default=0.7, ge=0)
    """The held-out metric must reach this (at least for auc/accuracy, at most for brier/log_loss)."""
    max_leakage_gap: float = Field(default=0.05, ge=0)
    """Random-split metric better than the time-split one by more than this: a leakage signal, fail."""
    margin_over_stable: float = Field(default=0.0, ge=-1, le=1)
    """The candidate's metric must beat the current stable's by this much (negative: may be this
    much worse)."""
    margin_over_fallback: float = Field(default=0.02, ge=-1, le=1)
    """The candidate's metric must beat the fallback rules' by this much."""
    golden_tolerance: float = Field(default=1e-4, gt=0)
    """Largest absolute difference from a golden example's recorded output."""
    max_golden_regressions: int = Field(default=0, ge=0)
    """Golden examples the stable version decides right (by the true label) and the candidate wrong."""
    fairness: Fairness = Fairness()
    """Fairness bounds."""
    load_seconds: float = Field(default=20.0, gt=0, le=3600)
    """Load test at twice `slo.peak_rps` for this long."""
    soak_seconds: float = Field(default=30.0, gt=0, le=86_400)
    """Soak at `slo.peak_rps` for this long, sampling the gateway's memory."""
    max_rss_growth: float = Field(default=0.1, gt=0)
    """Resident memory may grow by at most this share between the soak's first and last thirds."""
    required_signoffs: list[str] = ["model_owner"]
    """Roles that must have approved the version in `signoffs.yaml` next to its card."""
    alert_rules: str | None = "../docker/prometheus/alerts.yml"
    """Prometheus alert rules file (relative to the policy file) the monitoring phase checks."""
    production_url: str | None = None
    """A production gateway's base URL whose environment fingerprint must match (`--production-url`
    overrides)."""


class Policy(_Policy):
    """Everything the gateway enforces for one model."""

    model: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    """Name of the model (a directory of the model repository)."""
    description: str = ""
    """Free text for people reading the policy."""
    slo: Slo = Slo()
    """Latency, error-rate and load objectives."""
    input_schema: InputSchema = Field(alias="schema")
    """The request schema (`schema:` in YAML)."""
    routing: Routing = Routing()
    """Version routing."""
    guard: Guard = Guard()
    """Deadline, circuit breaker and where the model runs."""
    batching: Batching | None = None
    """Dynamic batching per version (off when absent)."""
    fallback: Fallback | None = None
    """Rule-based answers when the model cannot answer; without it such requests get 503/504."""
    faults: list[Fault] = []
    """Fault injection for rehearsals; refused unless the server allows it."""
    rollout: Rollout = Rollout()
    """Progressive rollout plan and rollback criteria."""
    drift: Drift = Drift()
    """Online drift monitoring."""
    feedback: Feedback = Feedback()
    """Outcome monitoring from delayed labels."""
    audit: Audit = Audit()
    """Audit log records and redaction."""
    readiness: Readiness | None = None
    """Release readiness checklist thresholds and the promotion gate (no gate when absent)."""

    def rule_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Fallback conditions naming unknown features or comparing unlike kinds, with their paths."""
        if self.fallback is None:
            return []
        kinds = {name: _RULE_KINDS[spec.type] for name, spec in self.input_schema.features.items()}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for i, rule in enumerate(self.fallback.rules):
            try:
                check_condition(parse_condition(rule.when), kinds)
            except RuleError as exc:
                problems.append((("fallback", "rules", i, "when"), str(exc)))
        return problems


class PolicyError(Exception):
    """A policy file is unreadable or invalid; carries every positioned problem."""

    def __init__(self, problems: list[Problem], model: str | None = None) -> None:
        super().__init__("; ".join(p.describe() for p in problems))
        self.problems = problems
        self.model = model
        """The model the file names, when it names one, so the server can fail closed for it."""


class LoadedPolicy(BaseModel):
    """A validated policy with its source and fingerprint."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    policy: Policy
    source: str
    sha256: str
    document: YamlDocument | None = None


def load_policy(path: Path) -> LoadedPolicy:
    """Read and validate one policy file, or raise PolicyError listing every problem."""
    try:
        policy, doc = read_validated(path, Policy, "a policy")
    except YamlDocumentError as exc:
        named = exc.data.get("model") if isinstance(exc.data, dict) else None
        raise PolicyError(exc.problems, named if isinstance(named, str) else None) from None
    rule_problems = policy.rule_problems()
    if rule_problems:
        raise PolicyError([doc.problem(loc, message) for loc, message in rule_problems], policy.model)
    return LoadedPolicy(policy=policy, source=str(path), sha256=doc.sha256, document=doc)


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a directory (`*.yaml` / `*.yml`), in name order."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def json_schema() -> str:
    """The JSON Schema of a policy file, as committed in policies/policy.schema.json."""
    schema = Policy.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Gateway model policy"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
