"""What is being served: loaded versions joined with their policies, as one immutable snapshot.

A snapshot is built completely on the side and then published by a single assignment; request
handlers take the current snapshot once and never lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ModelNotFound, Unavailable, VersionNotFound
from gateway.policy import LoadedPolicy, PolicyError, load_policy, policy_files
from gateway.policy_fit import policy_misfits
from gateway.repository import ModelRepository, ModelVersion, version_key
from gateway.validation import RequestValidator

log = logging.getLogger("gateway.registry")


@dataclass(frozen=True)
class ServedVersion:
    """A ready version and the validator compiled for it."""

    entry: ModelVersion
    validator: RequestValidator


@dataclass(frozen=True)
class ServedModel:
    """One model: its versions (ready or not), policy, and the version unversioned requests use."""

    name: str
    versions: dict[str, ModelVersion]
    served: dict[str, ServedVersion]
    policy: LoadedPolicy | None
    default_version: str | None
    not_ready_reason: str = ""
    version_reasons: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """Whether unversioned requests can be answered."""
        return self.default_version is not None

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

    def status(self) -> dict[str, Any]:
        """JSON-ready description for the status endpoint."""
        versions = []
        for v in sorted(self.versions, key=version_key):
            item = self.versions[v].status()
            if v not in self.served:
                item["state"] = "failed"
                item["reason"] = self.version_reasons.get(v) or item["reason"]
            versions.append(item)
        return {
            "name": self.name,
            "ready": self.ready,
            "reason": self.not_ready_reason or None,
            "default_version": self.default_version,
            "policy": ({"source": self.policy.source, "sha256": self.policy.sha256}
                       if self.policy else None),
            "versions": versions,
        }


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


def build_snapshot(repository: ModelRepository, policy_dir: Path, max_listed: int) -> Snapshot:
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
    models = {name: _serve_model(name, versions, policies.get(name), max_listed, rejected.get(name, ""))
              for name, versions in loaded.items()}
    return Snapshot(models=models, policy_problems=lines)


def _serve_model(name: str, versions: dict[str, ModelVersion], policy: LoadedPolicy | None,
                 max_listed: int, policy_invalid: str) -> ServedModel:
    served: dict[str, ServedVersion] = {}
    reasons: dict[str, str] = {}
    for v, entry in versions.items():
        if not entry.ready or entry.signature is None:
            reasons[v] = entry.reason
            continue
        if policy_invalid:
            reasons[v] = f"policy file rejected: {policy_invalid}"
            continue
        misfits = [m for m in (policy_misfits(policy.policy, entry.signature) if policy else []) if m.error]
        if misfits:
            reasons[v] = "policy does not fit this version: " + "; ".join(m.message for m in misfits)
            log.error("model %s version %s not served: %s", name, v, reasons[v])
            continue
        schema = policy.policy.input_schema if policy else None
        served[v] = ServedVersion(entry, RequestValidator(entry.signature, schema, max_listed))

    wanted = policy.policy.routing.stable if policy else None
    default: str | None
    reason = ""
    if wanted is not None:
        default = wanted if wanted in served else None
        if default is None:
            why = reasons.get(wanted, "no such version in the repository")
            reason = f"stable version {wanted!r} (from the policy) cannot serve: {why}"
    else:
        default = max(served, key=version_key) if served else None
        if default is None:
            reason = "no version can serve: " + "; ".join(f"{v}: {r}" for v, r in sorted(reasons.items()))
    return ServedModel(name, versions, served, policy, default, reason, reasons)
