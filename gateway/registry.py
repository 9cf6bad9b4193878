"""What is being served: loaded versions joined with their policies, as one immutable snapshot.

A snapshot is built completely on the side and then published by a single assignment; request
handlers take the current snapshot once and never lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.batching import Batcher
from gateway.breaker import CLOSED, AsyncBreaker, StateListener
from gateway.errors import ModelNotFound, Unavailable, VersionNotFound
from gateway.fallback import FallbackRules, choices_problems
from gateway.faults import FaultInjector
from gateway.policy import (
    Breaker,
    Guard,
    LoadedPolicy,
    LowConfidence,
    Policy,
    PolicyError,
    load_policy,
    policy_files,
)
from gateway.policy_fit import feature_signature, policy_misfits
from gateway.repository import ModelRepository, ModelVersion, version_key
from gateway.runtime import INLINE
from gateway.state import Aliases
from gateway.validation import RequestValidator

log = logging.getLogger("gateway.registry")


#: `guard.execution: auto` runs a version inline when its warm-up run took at most this long
#: (a thread hop costs ~0.1-0.2 ms of CPU on top of the run)
INLINE_MAX_RUN_MS = 0.25
#: rows an inline version runs at most in one call when the policy sets no `batching`
INLINE_MAX_BATCH = 64


@dataclass(frozen=True)
class ServedVersion:
    """A ready version with what guards it: its validator, breaker and (rehearsal) faults, and how it runs."""

    entry: ModelVersion
    validator: RequestValidator
    breaker: AsyncBreaker
    faults: FaultInjector | None = None
    execution: str = "thread"
    """`inline` (on the event loop) or `thread` (on the worker pool)."""
    batcher: Batcher | None = None
    """Gathers concurrent requests into shared runs (inline versions always; pool versions with `batching`)."""


@dataclass(frozen=True)
class ModelFallback:
    """A model's compiled fallback, with the validator it uses when no version can validate."""

    rules: FallbackRules
    validator: RequestValidator
    low_confidence: LowConfidence | None


@dataclass(frozen=True)
class ServedModel:
    """One model: its versions (ready or not), policy, guard and fallback, and its default version."""

    name: str
    versions: dict[str, ModelVersion]
    served: dict[str, ServedVersion]
    policy: LoadedPolicy | None
    aliases: Aliases
    """The effective routing (policy, or control state after switches and rollouts)."""
    policy_aliases: Aliases = field(default_factory=Aliases)
    """What the policy's `routing` declares (shown next to the effective aliases)."""
    alias_source: str = "policy"
    """Where `aliases` came from: `policy` or `state`."""
    version_reasons: dict[str, str] = field(default_factory=dict)
    timeout_s: float = Guard().timeout_ms / 1000
    fallback: ModelFallback | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def default_version(self) -> str | None:
        """The stable version, when it can serve."""
        stable = self.aliases.stable
        return stable if stable is not None and stable in self.served else None

    @property
    def not_ready_reason(self) -> str:
        """Why unversioned requests have no version to go to (empty when they have one)."""
        stable = self.aliases.stable
        if self.default_version is not None:
            return ""
        if stable is not None:
            why = self.version_reasons.get(stable, "no such version in the repository")
            return f"stable version {stable!r} (from the {self.alias_source}) cannot serve: {why}"
        return "no version can serve: " + "; ".join(f"{v}: {r}" for v, r in sorted(self.version_reasons.items()))

    def with_aliases(self, aliases: Aliases, source: str) -> ServedModel:
        """The same model with another alias table (the old value is untouched)."""
        return replace(self, aliases=aliases, alias_source=source)

    @property
    def routable(self) -> bool:
        """Whether unversioned requests have a model version to go to."""
        return self.default_version is not None

    @property
    def ready(self) -> bool:
        """Whether unversioned requests get an answer: from a version, or else from the fallback."""
        return self.routable or self.fallback is not None

    def entry(self, version: str) -> ModelVersion:
        """A version's repository entry, whether or not it serves; VersionNotFound if unknown."""
        found = self.versions.get(version)
        if found is None:
            raise VersionNotFound(f"model {self.name!r} has no version {version!r}; "
                                  f"versions: {sorted(self.versions, key=version_key)}")
        return found

    def resolve(self, version: str | None) -> ServedVersion:
        """The served version for a request (the default when `version` is None)."""
        if version is None:
            if self.default_version is None:
                raise Unavailable(f"model {self.name!r} is not ready: {self.not_ready_reason}")
            return self.served[self.default_version]
        self.entry(version)
        served = self.served.get(version)
        if served is None:
            raise Unavailable(f"model {self.name!r} version {version!r} is not ready: "
                              f"{self.version_reasons.get(version, 'not loaded')}")
        return served

    def degraded_reasons(self) -> list[str]:
        """Why this model is not running as its owner intended, right now (empty when healthy)."""
        reasons = list(self.problems)
        if not self.routable:
            reasons.append(f"no routable version ({self.not_ready_reason})"
                           + ("; the fallback answers" if self.fallback else ""))
        reasons += [f"version {v} not serving: {r}" for v, r in sorted(self.version_reasons.items())]
        for v, served in sorted(self.served.items()):
            if served.breaker.state != CLOSED:
                reasons.append(f"version {v} circuit breaker {served.breaker.state}")
            if served.faults is not None:
                reasons.append(f"version {v} has fault injection active")
        return reasons

    def status(self) -> dict[str, Any]:
        """JSON-ready description for the status endpoint."""
        versions = []
        for v in sorted(self.versions, key=version_key):
            item = self.versions[v].status()
            served = self.served.get(v)
            if served is None:
                item["state"] = "failed"
                item["reason"] = self.version_reasons.get(v) or item["reason"]
            else:
                item["breaker"] = served.breaker.status()
                item["faults"] = served.faults.status() if served.faults else None
                item["execution"] = served.execution
                if served.batcher is not None:
                    item["batching"] = served.batcher.status()
            versions.append(item)
        degraded = self.degraded_reasons()
        return {
            "name": self.name,
            "ready": self.ready,
            "routable": self.routable,
            "reason": self.not_ready_reason or None,
            "degraded": bool(degraded),
            "degraded_reasons": degraded,
            "default_version": self.default_version,
            "aliases": asdict(self.aliases),
            "alias_source": self.alias_source,
            "policy_aliases": asdict(self.policy_aliases),
            "timeout_ms": round(self.timeout_s * 1000, 3),
            "fallback": ({"rules": len(self.fallback.rules.conditions),
                          "low_confidence": self.fallback.low_confidence.model_dump()
                          if self.fallback.low_confidence else None} if self.fallback else None),
            "policy": ({"source": self.policy.source, "sha256": self.policy.sha256}
                       if self.policy else None),
            "versions": versions,
        }


class BreakerBoard:
    """The breakers of every version, kept across snapshots so a rebuild does not reset them."""

    def __init__(self, on_change: StateListener | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._breakers: dict[tuple[str, str], AsyncBreaker] = {}
        self._on_change = on_change
        self._clock = clock
        self.on_trip: Callable[[str], None] | None = None
        """Told `model/version` when a breaker trips on this replica (shared stores tell the others)."""

    def get(self, model: str, version: str, spec: Breaker) -> AsyncBreaker:
        """The breaker of one version (a new one when its settings changed)."""
        current = self._breakers.get((model, version))
        if current is None or (current.fail_max, current.reset_timeout_s) != (spec.fail_max, spec.reset_timeout_s):
            current = AsyncBreaker(f"{model}/{version}", spec.fail_max, spec.reset_timeout_s,
                                   clock=self._clock, on_change=self._on_change)
            current.on_trip = self._tripped
            self._breakers[(model, version)] = current
        return current

    def trip(self, model: str, version: str) -> bool:
        """Open a version's breaker because it tripped on another replica (False: unknown, or open)."""
        breaker = self._breakers.get((model, version))
        return breaker.trip_from_elsewhere() if breaker is not None else False

    def _tripped(self, name: str) -> None:
        if self.on_trip is not None:
            self.on_trip(name)


@dataclass(frozen=True)
class Snapshot:
    """Everything served at one moment."""

    models: dict[str, ServedModel]
    policy_problems: list[str]

    def model(self, name: str) -> ServedModel:
        """The model of that name, or ModelNotFound."""
        found = self.models.get(name)
        if found is None:
            raise ModelNotFound(f"unknown model {name!r}; served models: {sorted(self.models)}")
        return found

    @property
    def ready(self) -> bool:
        """Every model can answer unversioned requests (and there is at least one)."""
        return bool(self.models) and all(m.ready for m in self.models.values())

    def not_ready_reasons(self) -> list[str]:
        """Why the server is not ready, one line per model."""
        if not self.models:
            return ["no models in the model repository"]
        return [f"{m.name}: {m.not_ready_reason}" for m in self.models.values() if not m.ready]


@dataclass(frozen=True)
class PolicyProblem:
    """A policy file that could not be used, and for which model (when the file says)."""

    source: str
    model: str | None
    message: str


def read_policies(directory: Path) -> tuple[dict[str, LoadedPolicy], list[PolicyProblem]]:
    """Every valid policy by model name, and every problem (invalid file, second file for a model)."""
    policies: dict[str, LoadedPolicy] = {}
    problems: list[PolicyProblem] = []
    for path in policy_files(directory):
        try:
            loaded = load_policy(path)
        except PolicyError as exc:
            # A file too broken to name its model is taken to be for the model its file name names.
            problems.append(PolicyProblem(str(path), exc.model or path.stem, str(exc)))
            log.error("policy rejected: %s", exc)
            continue
        name = loaded.policy.model
        if name in policies:
            problems.append(PolicyProblem(str(path), name, f"{path}: model {name!r} already has a policy in "
                                                           f"{policies[name].source}"))
            log.error("policy rejected: %s", problems[-1].message)
            continue
        policies[name] = loaded
    return policies, problems


def build_snapshot(repository: ModelRepository, policy_dir: Path, max_listed: int,
                   breakers: BreakerBoard | None = None, allow_faults: bool = False) -> Snapshot:
    """Load every version and policy and join them into a snapshot.

    A model whose policy file was rejected is not served at all (fail closed): serving it with
    no policy would drop the checks its owner asked for.
    """
    loaded = repository.load_all()
    policies, problems = read_policies(policy_dir)
    lines = [p.message for p in problems]
    for name in sorted(policies.keys() - loaded.keys()):
        lines.append(f"{policies[name].source}: model {name!r} is not in the model repository")
    rejected = {p.model: p.message for p in problems if p.model and p.model not in policies}
    board = breakers or BreakerBoard()
    models = {name: _serve_model(name, versions, policies.get(name), max_listed, rejected.get(name, ""),
                                 board, allow_faults)
              for name, versions in loaded.items()}
    return Snapshot(models=models, policy_problems=lines)


def _serve_model(name: str, versions: dict[str, ModelVersion], policy: LoadedPolicy | None,
                 max_listed: int, policy_invalid: str, breakers: BreakerBoard, allow_faults: bool) -> ServedModel:
    spec = policy.policy if policy else None
    guard = spec.guard if spec else Guard()
    faults, problems = _faults(spec, versions, allow_faults)
    served: dict[str, ServedVersion] = {}
    reasons: dict[str, str] = {}
    for v, entry in versions.items():
        candidate, why = serve_version(name, entry, policy, policy_invalid, breakers, faults.get(v), max_listed)
        if candidate is None:
            reasons[v] = why
        else:
            served[v] = candidate

    aliases = _policy_aliases(spec, served)
    fallback = None
    if spec is not None and spec.fallback is not None and not policy_invalid:
        fallback, problem = _fallback(spec, served, versions, aliases.stable, max_listed)
        problems += [problem] if problem else []
    return ServedModel(name, versions, served, policy, aliases, aliases, "policy", reasons, guard.timeout_ms / 1000,
                       fallback, problems)


def _policy_aliases(spec: Policy | None, served: dict[str, ServedVersion]) -> Aliases:
    """The routing the policy declares (stable defaults to the highest version that serves)."""
    routing = spec.routing if spec else None
    stable = routing.stable if routing and routing.stable is not None else (
        max(served, key=version_key) if served else None)
    canary = routing.canary if routing else None
    shadow = routing.shadow if routing else None
    return Aliases(stable=stable, canary=canary.version if canary else None,
                   canary_percent=canary.percent if canary else 0.0,
                   shadow=shadow.version if shadow else None, shadow_percent=shadow.percent if shadow else 0.0)


def serve_version(name: str, entry: ModelVersion, policy: LoadedPolicy | None, policy_invalid: str,
                  breakers: BreakerBoard, faults: FaultInjector | None,
                  max_listed: int) -> tuple[ServedVersion | None, str]:
    """A loaded version joined with its model's policy, or None and why it cannot serve."""
    if not entry.ready or entry.signature is None:
        return None, entry.reason
    if policy_invalid:
        return None, f"policy file rejected: {policy_invalid}"
    spec = policy.policy if policy else None
    score = entry.card.score if entry.card else None
    misfits = [m for m in (policy_misfits(spec, entry.signature, score) if spec else []) if m.error]
    if misfits:
        why = "policy does not fit this version: " + "; ".join(m.message for m in misfits)
        log.error("model %s version %s not served: %s", name, entry.version, why)
        return None, why
    guard = spec.guard if spec else Guard()
    validator = RequestValidator(entry.signature, spec.input_schema if spec else None, max_listed)
    execution, batcher = _execution(spec, entry, faults)
    return ServedVersion(entry, validator, breakers.get(name, entry.version, guard.breaker), faults,
                         execution, batcher), ""


def _execution(spec: Policy | None, entry: ModelVersion, faults: FaultInjector | None) -> tuple[str, Batcher | None]:
    """Where this version's runs happen (see `guard.execution` and `batching` in the policy).

    Inline versions always go through a batcher on the loop: the requests that reach the model in
    the same event-loop turn share one run. Pool versions batch only when the policy says so.
    """
    assert entry.model is not None
    batching = spec.batching if spec else None
    wanted = spec.guard.execution if spec else "auto"
    run_ms = entry.model.run_ms
    inline = faults is None and (wanted == "inline" or (
        wanted == "auto" and run_ms is not None and run_ms <= INLINE_MAX_RUN_MS))
    if inline:  # (injected delays sleep: a version with faults never runs on the event loop)
        signature = entry.model.signature
        stackable = all(t.shape and t.shape[0] == -1 for t in (*signature.inputs, *signature.outputs)) and all(
            -1 not in t.shape[1:] for t in signature.inputs)  # requests of different widths cannot be stacked
        size, delay_s = ((batching.max_batch_size, batching.max_queue_delay_ms / 1000) if batching
                         else (INLINE_MAX_BATCH if stackable else 1, 0.0))  # 1 row: never stacks requests
        return "inline", Batcher(entry.model, size, delay_s, inline=INLINE)
    if batching is None:
        return "thread", None
    return "thread", Batcher(entry.model, batching.max_batch_size, batching.max_queue_delay_ms / 1000,
                             batching.max_concurrent_batches, faults=faults.before_run if faults else None)


def _faults(spec: Policy | None, versions: dict[str, ModelVersion],
            allowed: bool) -> tuple[dict[str, FaultInjector], list[str]]:
    if spec is None or not spec.faults:
        return {}, []
    if not allowed:
        return {}, ["policy `faults` refused: this server does not allow fault injection "
                    "(GATEWAY_ALLOW_FAULT_INJECTION=false)"]
    problems = [f"policy `faults` names version {f.version!r}, which is not in the repository"
                for f in spec.faults if f.version not in versions]
    return {f.version: FaultInjector(f) for f in spec.faults if f.version in versions}, problems


def _fallback(spec: Policy, served: dict[str, ServedVersion], versions: dict[str, ModelVersion],
              default: str | None, max_listed: int) -> tuple[ModelFallback | None, str]:
    """Compile the fallback against the model's output signature (from a served version or a card)."""
    assert spec.fallback is not None
    signature = None
    for v in ([default] if default in served else []) + sorted(served, key=version_key, reverse=True):
        signature = served[v].entry.signature
        break
    if signature is None:
        signature = next((e.card.signature for e in versions.values() if e.card is not None), None)
    if signature is None:
        return None, "fallback unavailable: no version or card tells the model's output signature"
    choices: list[tuple[object, Any]] = [(i, rule.output) for i, rule in enumerate(spec.fallback.rules)]
    choices.append(("default", spec.fallback.default))
    problems = [message for _, _, message in choices_problems(choices, signature.outputs)]
    if problems:
        return None, "fallback unavailable: " + "; ".join(problems)
    features = spec.input_schema.features
    rules = FallbackRules(spec.fallback, signature.outputs, features)
    return ModelFallback(rules, RequestValidator(feature_signature(features), spec.input_schema, max_listed),
                         spec.fallback.low_confidence), ""
