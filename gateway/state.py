"""Control state: the effective alias table and rollout of each model, kept in the state directory.

Which wins, the policy's `routing` or the state file? The state file, as long as the policy's
`routing` section is the one the state was derived from (its hash is stored with the state): so
switches, rollbacks and rollout steps survive restarts, and an old `stable:` in a policy never
silently resurrects a version that was rolled back. When the owner edits `routing` in the
policy, that is a new intent: the policy wins and the state is reset to it (and says so).

Files are written atomically: a temporary file in the same directory, fsynced, renamed over the
old one, and the directory fsynced, so a crash leaves the old state or the new, never half.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("gateway.state")


@dataclass(frozen=True)
class Aliases:
    """Where a model's traffic goes: one immutable value, replaced as a whole on every change."""

    stable: str | None = None
    previous_stable: str | None = None
    canary: str | None = None
    canary_percent: float = 0.0
    shadow: str | None = None
    shadow_percent: float = 0.0

    def versions(self) -> set[str]:
        """Every version an alias points at (these must stay loaded)."""
        return {v for v in (self.stable, self.previous_stable, self.canary, self.shadow) if v is not None}

    def referencing(self, version: str) -> list[str]:
        """The alias names that point at `version`."""
        names = ("stable", "previous_stable", "canary", "shadow")
        return [name for name in names if getattr(self, name) == version]

    def with_changes(self, **changes: Any) -> Aliases:
        """A new table with some aliases changed."""
        return replace(self, **changes)


@dataclass(frozen=True)
class RolloutState:
    """A progressive rollout's persisted progress."""

    version: str
    steps: tuple[float, ...]
    step: int = 0
    status: str = "running"  # running | paused | completed | rolled_back | aborted
    reason: str = ""
    started_at: float = 0.0
    step_started_at: float = 0.0
    actor: str = ""
    history: tuple[dict[str, Any], ...] = ()
    forced: bool = False
    """Started past the readiness gate by an admin: promotion does not check the gate again."""
    report_sha256: str = ""
    """The passing readiness report that opened the gate at the start (empty: not gated, or forced)."""

    @property
    def active(self) -> bool:
        """Running or paused (not finished)."""
        return self.status in ("running", "paused")


@dataclass(frozen=True)
class ModelState:
    """Everything persisted for one model."""

    aliases: Aliases
    routing_hash: str
    rollout: RolloutState | None = None
    updated_at: float = 0.0
    unloaded: tuple[str, ...] | None = ()
    """Versions an admin unloaded (repository API): not served by any replica until loaded again. None
    when read from a state written by a gateway that did not keep this list (a replica keeps its own)."""


def routing_hash(routing: dict[str, Any]) -> str:
    """Fingerprint of a policy's routing section (canonical JSON)."""
    return hashlib.sha256(json.dumps(routing, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_state(state: ModelState) -> bytes:
    """A model's state as canonical JSON (what every store keeps)."""
    payload = {
        "aliases": asdict(state.aliases),
        "routing_hash": state.routing_hash,
        "rollout": {**asdict(state.rollout), "steps": list(state.rollout.steps),
                    "history": list(state.rollout.history)} if state.rollout else None,
        "updated_at": state.updated_at,
        "unloaded": sorted(state.unloaded or ()),
    }
    return json.dumps(payload, indent=2, sort_keys=True).encode()


def decode_state(data: bytes | str) -> ModelState:
    """The inverse of `encode_state`; ValueError, KeyError or TypeError for anything else."""
    payload = json.loads(data)
    if not isinstance(payload, dict):
        raise ValueError("the state is not a JSON object")
    rollout = payload.get("rollout")
    return ModelState(
        aliases=Aliases(**payload["aliases"]),
        routing_hash=str(payload["routing_hash"]),
        rollout=RolloutState(**{**rollout, "steps": tuple(rollout["steps"]),
                                "history": tuple(rollout.get("history", ()))}) if rollout else None,
        updated_at=float(payload.get("updated_at", 0.0)),
        unloaded=tuple(str(v) for v in payload["unloaded"]) if "unloaded" in payload else None,
    )


class StaleState(Exception):
    """Another replica changed the model's state since this replica last saw it (nothing was written)."""


class ControlStateStore(Protocol):
    """Where each model's control state lives (a file per model by default; Redis for replicas)."""

    kind: str
    shared: bool

    def load(self, model: str) -> ModelState | None:
        """The stored state, or None (none, or unreadable: logged)."""

    def save(self, model: str, state: ModelState, expect: float | None = None) -> None:
        """Store durably; OSError when it cannot (the change is then refused). A shared store raises
        StaleState when the stored state is not the one last seen (`expect`: its `updated_at`)."""

    def status(self) -> dict[str, Any]:
        """For /status."""

    def lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take or renew the lease `name` for `owner` (e.g. who drives a rollout); False if another holds it."""

    def release(self, name: str, owner: str) -> None:
        """Give the lease up if `owner` holds it."""


class StateStore:
    """Reads and atomically writes `<dir>/<model>.state.json` (the default: one replica's own state)."""

    kind = "file"
    shared = False
    """Whether other replicas see what this store saves (then they watch it for changes)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, model: str) -> Path:
        """The state file of one model."""
        return self.directory / f"{model}.state.json"

    def load(self, model: str) -> ModelState | None:
        """The stored state, or None when there is none (or it cannot be read: logged, not fatal)."""
        path = self.path(model)
        if not path.exists():
            return None
        try:
            return decode_state(path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("state file %s is unreadable (%s); starting from the policy's routing", path, exc)
            return None

    def save(self, model: str, state: ModelState, expect: float | None = None) -> None:
        """Write atomically and durably (temp file, fsync, rename, fsync of the directory); one replica
        owns its files, so `expect` is not checked."""
        write_atomically(self.path(model), encode_state(state))

    def status(self) -> dict[str, Any]:
        """For /status: where state lives and whether it can be reached."""
        return {"kind": self.kind, "ok": True, "location": str(self.directory)}

    def lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """One replica owns its file store: every lease is its own."""
        return True

    def release(self, name: str, owner: str) -> None:
        """Nothing to give up."""


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never half of one:
    a temporary file in the same directory, fsynced, renamed over `path`, then the directory fsynced."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
