"""Release control: alias changes, runtime load/unload, and the record of every decision.

Every change is built on the side, made durable in the state store, and only then published by
one assignment of the gateway's snapshot: a change that cannot be stored is refused, never half
applied, and requests in flight finish on the snapshot they started with. Changes are
serialised by one asyncio lock (the hot path never takes it).

The readiness gate: when a model's policy says `readiness: {gate: enforce}`, making a version
stable (a switch, or the promotion that ends a rollout, checked when the rollout starts and again
when it completes) needs a stored passing readiness report for that version's model file and the
current policy, unless an admin forces it. Going back to `previous_stable` is a rollback and never
gated. Every gate decision is recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.errors import ClientError, GatewayError, ModelNotFound
from gateway.readiness.store import ReportStore
from gateway.registry import ServedModel, ServedVersion, Snapshot
from gateway.repository import ModelRepository, ModelVersion, version_key
from gateway.state import Aliases, ControlStateStore, ModelState, RolloutState, StaleState, routing_hash

log = logging.getLogger("gateway.control")

EVENTS_KEPT = 1000
#: a manual canary above this share of traffic is a promotion in all but name: the readiness gate applies
MAJORITY_CANARY = 50.0
#: joins a freshly loaded version with its model's policy: (served version or None, why not)
ServeVersion = Callable[[ServedModel, ModelVersion], tuple[ServedVersion | None, str]]


class Conflict(ClientError):
    """The change contradicts the current state (e.g. unloading a version an alias points at)."""


class StoreFailed(GatewayError):
    """The change could not be made durable, so it was not applied."""


class GateClosed(ClientError):
    """Promotion to stable needs a passing readiness report for the model file and policy (409)."""


@dataclass(frozen=True)
class Gate:
    """The readiness gate's verdict on making a version stable."""

    enforced: bool = False
    """False: the policy has no enforced gate, or the version is the previous stable (a rollback)."""
    report_sha256: str = ""
    """The passing report that opened it."""
    forced: bool = False
    """Opened by an admin without a passing report."""

    def fields(self) -> dict[str, Any]:
        """What the change's event and answer carry about the gate (nothing when none applied)."""
        if not self.enforced:
            return {}
        return {"gate": {"readiness_report": self.report_sha256 or None, "forced": self.forced}}


@dataclass(frozen=True)
class Change:
    """The outcome of one control action."""

    model: str
    action: str
    before: dict[str, Any]
    after: dict[str, Any]
    took_ms: float
    extra: dict[str, Any] = field(default_factory=dict)
    """Further facts of the decision (e.g. `gate`), shown only when there are any."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the admin API."""
        data = asdict(self)
        extra = data.pop("extra")
        return {**data, **extra}


class ReleaseControl:
    """Owns every change to what is served and where traffic goes."""

    def __init__(self, get: Callable[[], Snapshot], publish: Callable[[Snapshot], None], store: ControlStateStore,
                 repository: ModelRepository, serve: ServeVersion,
                 events_file: Path | None, clock: Callable[[], float] = time.time,
                 on_change: Callable[[str, str], None] | None = None, reports: ReportStore | None = None) -> None:
        self._get = get
        self.reports = reports
        """Readiness reports for the gate (None: no report ever passes an enforced gate)."""
        self._on_change = on_change
        self._publish = publish
        self._serve = serve
        self.store = store
        self._repository = repository
        self._events_file = events_file
        self._clock = clock
        self.lock = asyncio.Lock()
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.rollouts: dict[str, RolloutState | None] = {}
        self._seen_at: dict[str, float] = {}
        self.unloaded: dict[str, tuple[str, ...]] = {}
        """Per model, the versions an admin unloaded (shared with every replica through the store)."""
        self.diverged: dict[str, str] = {}
        """Per model, why this replica cannot follow the shared state (changes here are refused meanwhile)."""
        """Per model, the `updated_at` of the stored state this replica last wrote or adopted."""
        self._stable_files: dict[tuple[str, str], str] = {}
        """(model, version) -> sha256 of the file that served as stable: a switch back to the previous
        stable is a rollback only while it is the same file."""
        self.on_adopted: Callable[[str], None] | None = None
        """Told the model whose state another replica changed (the rollout controller follows it)."""
        self.on_record: Callable[[dict[str, Any]], None] | None = None
        """Also hands every decision to the audit log."""

    def current(self) -> Snapshot:
        """The snapshot being served now."""
        return self._get()

    # --- startup ---------------------------------------------------------------------------

    def reconcile(self, snapshot: Snapshot) -> Snapshot:
        """Apply stored state where it still matches the policy's routing; store the rest."""
        reconciled = self._reconcile(snapshot)
        for model in reconciled.models.values():
            self._note_stable(model, model.aliases)
        return reconciled

    def _note_stable(self, model: ServedModel, aliases: Aliases) -> None:
        served = model.served.get(aliases.stable) if aliases.stable is not None else None
        if aliases.stable is not None and served is not None:
            self._stable_files[(model.name, aliases.stable)] = served.entry.sha256

    def _reconcile(self, snapshot: Snapshot) -> Snapshot:
        models = dict(snapshot.models)
        for name, model in snapshot.models.items():
            declared = _routing_of(model)
            stored = self.store.load(name)
            if stored is not None:
                self._seen_at[name] = stored.updated_at
            earlier = (stored.unloaded or ()) if stored is not None else ()
            if stored is not None and stored.routing_hash == declared:
                models[name] = _unloading(model.with_aliases(stored.aliases, "state"), earlier)
                self.rollouts[name] = stored.rollout
                self.unloaded[name] = earlier
                continue
            # the policy's routing wins; unloads stay, except of versions it routes to
            kept = tuple(v for v in earlier if not model.aliases.referencing(v))
            if stored is not None:
                self.record("system", name, "policy_routing_changed", asdict(stored.aliases),
                            asdict(model.aliases), reason="the policy's routing section changed: it wins",
                            extra={"unloaded": list(kept), "loaded_again": [v for v in earlier if v not in kept]})
            models[name] = _unloading(model, kept)
            self.rollouts[name] = None
            self.unloaded[name] = kept
            fresh = ModelState(model.aliases, declared, None, self._clock(), kept)
            try:
                self.store.save(name, fresh, stored.updated_at if stored is not None else None)
                self._seen_at[name] = fresh.updated_at
            except (OSError, StaleState) as exc:
                log.error("cannot write the state of %s: %s (changes will be refused)", name, exc)
        return replace(snapshot, models=models)

    async def apply_shared(self, model: str) -> None:
        """Adopt another replica's change to `model` from a shared store (nothing if it is the state this
        replica last wrote or adopted). Replicas whose policies route differently keep their own."""
        seen_before = self._seen_at.get(model)
        stored = await asyncio.to_thread(self.store.load, model)
        async with self.lock:
            if self._seen_at.get(model) != seen_before:
                return  # a local change was stored while this was read: the next read brings the news
            current = self._get().models.get(model)
            if current is None:
                return
            if stored is None:
                await self._restore_locked(current)
                return
            if stored.updated_at == self._seen_at.get(model):
                return
            if stored.routing_hash != _routing_of(current):
                self._seen_at[model] = stored.updated_at
                log.warning("shared state of %s was written under another policy routing; keeping this "
                            "replica's policy", model)
                return
            # an older gateway writes no list of unloads: keep this replica's rather than load them all
            unloaded = stored.unloaded if stored.unloaded is not None else self.unloaded.get(model, ())
            wanted = [v for v in sorted(current.versions, key=version_key)
                      if v not in unloaded and v not in current.served
                      and current.version_reasons.get(v) == "unloaded"]
            if wanted:  # loaded again elsewhere: load here before aliases may route to them
                prepared = await self._prepare_load(current, wanted)
                self._publish_load(prepared, "state-store", "another replica's load")
            if not self._adopt_aliases_locked(model, stored):
                return  # _seen_at stays behind: a change made here is refused until this replica can follow
            self._seen_at[model] = stored.updated_at
            self.unloaded[model] = unloaded
            current = self._get().models[model]
            gone = [v for v in unloaded if v in current.served and not current.aliases.referencing(v)]
            if gone:
                self._unload_locked(current, gone, "state-store", "another replica's unload")

    def _adopt_aliases_locked(self, model: str, stored: ModelState) -> bool:
        """Follow the stored aliases and rollout; False (logged once per state) when they route to a
        version this replica does not serve: it keeps its own and refuses changes until it can follow."""
        current = self._get().models[model]
        missing = [v for v in (stored.aliases.stable, stored.aliases.canary, stored.aliases.shadow)
                   if v is not None and v not in current.served]
        if missing:
            why = (f"the shared state routes to versions this replica does not serve ({', '.join(missing)}: "
                   + "; ".join(f"{v}: {current.version_reasons.get(v, 'not loaded')}" for v in missing) + ")")
            if self.diverged.get(model) != why:
                log.error("%s: %s; keeping its own aliases until it can follow", model, why)
            self.diverged[model] = why
            return False
        self.diverged.pop(model, None)
        if stored.aliases == current.aliases and stored.rollout == self.rollouts.get(model):
            return True
        if stored.aliases == current.aliases:  # rollout progress only: no new snapshot to publish
            self.rollouts[model] = stored.rollout
            if self.on_adopted is not None:
                self.on_adopted(model)
            return True
        snapshot = self._get()
        self._publish(replace(snapshot, models={**snapshot.models,
                                                model: current.with_aliases(stored.aliases, "state")}))
        self.rollouts[model] = stored.rollout
        self._note_stable(current, stored.aliases)
        if self._on_change is not None:
            self._on_change(model, "synced")
        self.record("state-store", model, "synced", asdict(current.aliases), asdict(stored.aliases),
                    reason="another replica's change, from the shared state store")
        if self.on_adopted is not None:
            self.on_adopted(model)
        return True

    async def _restore_locked(self, current: ServedModel) -> None:
        """A shared store that answers but has lost this model's state (a Redis restarted without its
        data): write back what this replica knows, so a replica starting next does not reset the fleet."""
        if not self.store.status()["ok"] or current.name not in self._seen_at:
            return
        state = ModelState(current.aliases, _routing_of(current), self.rollouts.get(current.name), self._clock(),
                           self.unloaded.get(current.name, ()))
        try:
            await asyncio.to_thread(self.store.save, current.name, state, None)
        except (OSError, StaleState) as exc:  # another replica restored it first, or the store went away
            log.info("not restoring the shared state of %s: %s", current.name, exc)
            return
        self._seen_at[current.name] = state.updated_at
        log.warning("shared state of %s was missing; restored this replica's", current.name)

    # --- alias changes -----------------------------------------------------------------------

    async def switch(self, model: str, version: str, actor: str, force: bool = False) -> Change:
        """Make `version` stable; the old stable stays loaded as `previous_stable`.

        Under an enforced readiness gate this needs a passing report, or `force` (checked by the caller
        to come from an admin); GateClosed otherwise."""
        async with self.lock:
            current = self._model(model)
            self.require_serving(current, version)
            old = current.aliases
            if old.stable == version:
                raise Conflict(f"version {version!r} is already stable")
            gate = await self.check_gate_locked(current, version, actor, force, "switch")
            drop_canary = old.canary == version or self._rollout_active(model)  # a switch ends a rollout
            new = old.with_changes(stable=version, previous_stable=old.stable,
                                   canary=None if drop_canary else old.canary,
                                   canary_percent=0.0 if drop_canary else old.canary_percent)
            return await self._apply(current, new, "switch", actor, end_rollout="aborted: manual switch",
                                     extra=gate.fields())

    async def rollback(self, model: str, actor: str, reason: str = "") -> Change:
        """Make the previous stable version stable again, and drop any canary."""
        async with self.lock:
            return await self.rollback_locked(model, actor, reason)

    async def rollback_locked(self, model: str, actor: str, reason: str = "") -> Change:
        """`rollback` for callers that hold the lock (the rollout controller)."""
        current = self._model(model)
        old = current.aliases
        if old.canary is not None and self._rollout_active(model):
            new = old.with_changes(canary=None, canary_percent=0.0)  # a rollout's rollback drops the canary
        elif old.previous_stable is None:
            raise Conflict(f"model {model!r} has no previous stable version to roll back to")
        else:
            self.require_serving(current, old.previous_stable)
            new = old.with_changes(stable=old.previous_stable, previous_stable=old.stable, canary=None,
                                   canary_percent=0.0)
        return await self._apply(current, new, "rollback", actor, reason=reason,
                                 end_rollout=f"rolled_back: {reason or 'manual rollback'}")

    async def set_canary(self, model: str, version: str | None, percent: float, actor: str,
                         action: str = "canary", rollout: RolloutState | None = None) -> Change:
        """Point the canary at `version` with `percent` of traffic (None clears it)."""
        async with self.lock:
            return await self.set_canary_locked(model, version, percent, actor, action, rollout)

    async def set_canary_locked(self, model: str, version: str | None, percent: float, actor: str,
                                action: str = "canary", rollout: RolloutState | None = None) -> Change:
        """`set_canary` for callers that hold the lock."""
        current = self._model(model)
        extra = None
        if version is not None:
            self.require_serving(current, version)
            if version == current.aliases.stable:
                raise Conflict(f"version {version!r} is stable; a canary must be another version")
            if action == "canary" and percent > MAJORITY_CANARY:  # a rollout's steps were gated at its start
                extra = (await self.check_gate_locked(current, version, actor, False, "canary")).fields() or None
        new = current.aliases.with_changes(canary=version, canary_percent=percent if version else 0.0)
        return await self._apply(current, new, action, actor, rollout=rollout, extra=extra)

    async def promote_locked(self, model: str, actor: str, rollout: RolloutState, gate: Gate | None = None) -> Change:
        """The canary becomes stable (end of a rollout; the caller has checked the readiness gate)."""
        current = self._model(model)
        old = current.aliases
        if old.canary is None:
            raise Conflict("no canary to promote")
        new = old.with_changes(stable=old.canary, previous_stable=old.stable, canary=None, canary_percent=0.0)
        return await self._apply(current, new, "promote", actor, rollout=rollout,
                                 extra=gate.fields() if gate else None)

    async def save_rollout_locked(self, model: str, rollout: RolloutState, action: str, actor: str,
                                  reason: str = "") -> Change:
        """Persist rollout progress without changing aliases."""
        current = self._model(model)
        return await self._apply(current, current.aliases, action, actor, reason=reason, rollout=rollout)

    # --- the readiness gate ----------------------------------------------------------------------

    async def check_gate_locked(self, current: ServedModel, version: str, actor: str, force: bool,
                                purpose: str) -> Gate:
        """Whether `version` may become stable (for `purpose`: switch, rollout, promote); records the
        decision when a gate applies. GateClosed without a passing report, unless `force`."""
        policy = current.policy
        readiness = policy.policy.readiness if policy is not None else None
        if policy is None or readiness is None or readiness.gate != "enforce":
            return Gate()
        served = current.served.get(version)
        model_sha = served.entry.sha256 if served is not None else current.entry(version).sha256
        if version == current.aliases.previous_stable and self._stable_files.get((current.name, version)) == model_sha:
            return Gate()  # back to the very file that was stable just before: a rollback, never gated
        target = {"version": version, "for": purpose, "model_sha256": model_sha, "policy_sha256": policy.sha256}
        before = {"stable": current.aliases.stable}
        found = await self._passing(current.name, version, model_sha, policy.sha256)
        if found is not None:
            self.record(actor, current.name, "gate_passed", before, {**target, "readiness_report": found["sha256"]})
            return Gate(True, report_sha256=found["sha256"])
        message = await self._gate_message(current.name, version, model_sha, policy.sha256)
        if force:
            self.record(actor, current.name, "gate_forced", before, target, reason=message)
            return Gate(True, forced=True)
        self.record(actor, current.name, "gate_refused", before, target, reason=message)
        raise GateClosed(message)

    async def _passing(self, model: str, version: str, model_sha: str, policy_sha: str) -> dict[str, Any] | None:
        if self.reports is None:
            return None
        # files are read (and verified) off the loop: reports carry plot data and may be large
        return await asyncio.to_thread(self.reports.passing, model, version, model_sha, policy_sha)

    async def _gate_message(self, model: str, version: str, model_sha: str, policy_sha: str) -> str:
        reports = await asyncio.to_thread(self.reports.summaries, model) if self.reports is not None else []
        return (f"readiness gate: no passing readiness report for {model} version {version} with model file "
                f"{model_sha[:12]} and policy {policy_sha[:12]}{_why_not(reports, version, model_sha, policy_sha)}; "
                f"run `gateway readiness {model} {version}` and upload its report (PUT /admin/readiness), "
                f"or have an admin force it (`force: true`, audited)")

    async def set_shadow(self, model: str, version: str | None, percent: float, actor: str) -> Change:
        """Mirror `percent` of answered requests to `version` (None stops mirroring)."""
        async with self.lock:
            current = self._model(model)
            if version is not None:
                self.require_serving(current, version)
            new = current.aliases.with_changes(shadow=version, shadow_percent=percent if version else 0.0)
            return await self._apply(current, new, "shadow", actor)

    # --- runtime load / unload ---------------------------------------------------------------

    async def load(self, model: str, versions: list[str] | None, actor: str) -> Change:
        """Load (verify, warm up) versions found on disk; by default every one not serving yet. Versions
        an admin had unloaded, once loaded here, are taken off the shared list, so every replica loads
        them too (nothing is stored when they are refused here)."""
        async with self.lock:
            snapshot = self._get()
            current = snapshot.models.get(model)
            on_disk = self._repository.discover().get(model, [])
            if not on_disk:
                raise ModelNotFound(f"no versions of {model!r} in the model repository")
            wanted = versions or [v for v in on_disk if current is None or v not in current.served]
            missing = [v for v in wanted if v not in on_disk]
            if missing:
                raise ClientError(f"versions {missing} of {model!r} are not in the model repository")
            if current is None:
                raise Conflict(f"model {model!r} appeared after start; restart to serve a new model")
            prepared = await self._prepare_load(current, wanted)  # verified and warmed up, not yet serving
            loaded = prepared[1]
            unloaded = tuple(v for v in self.unloaded.get(model, ()) if v not in loaded)
            if unloaded != self.unloaded.get(model, ()):  # loaded back after an unload: on every replica
                await self._save_locked(current, current.aliases, self.rollouts.get(model), unloaded)
            change = self._publish_load(prepared, actor)
            if change.after["refused"] and not change.after["loaded"]:
                raise Conflict(f"refused: {change.after['refused']}")
            return change

    async def _prepare_load(self, current: ServedModel, wanted: list[str]
                            ) -> tuple[ServedModel, list[str], dict[str, str], float]:
        """Load, verify and warm up versions off the loop: the model as it would serve them, which
        loaded, which were refused (and why), and when this started."""
        started = time.perf_counter()
        model = current.name
        entries = await asyncio.gather(*(asyncio.to_thread(self._repository.load_version, model, v)
                                         for v in wanted))
        current = self._get().models[model]
        versions_map = dict(current.versions)
        served = dict(current.served)
        reasons = dict(current.version_reasons)
        loaded, refused = [], {}
        for entry in entries:
            candidate, why = self._serve(current, entry)
            if candidate is not None:
                versions_map[entry.version] = entry
                served[entry.version] = candidate
                reasons.pop(entry.version, None)
                loaded.append(entry.version)
            else:  # a failed reload leaves a serving version as it was
                refused[entry.version] = why
                if entry.version not in served:
                    versions_map[entry.version] = entry
                    reasons[entry.version] = why
        return replace(current, versions=versions_map, served=served, version_reasons=reasons), loaded, refused, \
            started

    def _publish_load(self, prepared: tuple[ServedModel, list[str], dict[str, str], float], actor: str,
                      reason: str = "") -> Change:
        new_model, loaded, refused, started = prepared
        before = self._get().models[new_model.name]
        self._publish(replace(self._get(), models={**self._get().models, new_model.name: new_model}))
        took = (time.perf_counter() - started) * 1000
        change = Change(new_model.name, "load", {"serving": sorted(before.served, key=version_key)},
                        {"serving": sorted(new_model.served, key=version_key), "loaded": loaded, "refused": refused},
                        took)
        self.record(actor, new_model.name, "load", change.before, change.after, reason=reason)
        return change

    async def unload(self, model: str, versions: list[str] | None, actor: str) -> Change:
        """Stop serving versions; refused for any version an alias points at. With a shared store every
        replica stops serving them (and a replica started later does not serve them either)."""
        async with self.lock:
            current = self._model(model)
            targets = versions or sorted(current.versions, key=version_key)
            for v in targets:
                current.entry(v)
                held = current.aliases.referencing(v)
                if held:
                    raise Conflict(f"version {v!r} of {model!r} is {' and '.join(held)}; switch or clear the "
                                   f"alias first" + ("" if versions else " (or unload a single version: "
                                                                            "?version=N)"))
            unloaded = tuple(sorted({*self.unloaded.get(model, ()), *targets}, key=version_key))
            if unloaded != self.unloaded.get(model, ()):
                await self._save_locked(current, current.aliases, self.rollouts.get(model), unloaded)
            return self._unload_locked(current, targets, actor)

    def _unload_locked(self, current: ServedModel, targets: list[str], actor: str, reason: str = "") -> Change:
        started = time.perf_counter()
        new_model = _unloading(current, targets)
        self._publish(replace(self._get(), models={**self._get().models, current.name: new_model}))
        took = (time.perf_counter() - started) * 1000
        change = Change(current.name, "unload", {"serving": sorted(current.served, key=version_key)},
                        {"serving": sorted(new_model.served, key=version_key)}, took)
        self.record(actor, current.name, "unload", change.before, change.after, reason=reason)
        return change

    # --- shared ------------------------------------------------------------------------------

    async def _apply(self, current: ServedModel, aliases: Aliases, action: str, actor: str, reason: str = "",
                     end_rollout: str = "", rollout: RolloutState | None = None,
                     extra: dict[str, Any] | None = None) -> Change:
        started = time.perf_counter()
        name = current.name
        state_rollout = rollout if rollout is not None else self.rollouts.get(name)
        if end_rollout and state_rollout is not None and state_rollout.active:
            status, _, why = end_rollout.partition(": ")
            state_rollout = replace(state_rollout, status=status, reason=why)
        await self._save_locked(current, aliases, state_rollout, self.unloaded.get(name, ()))
        stored_ms = (time.perf_counter() - started) * 1000
        swap_started = time.perf_counter()
        snapshot = self._get()
        self._publish(replace(snapshot, models={**snapshot.models, name: current.with_aliases(aliases, "state")}))
        swap_us = (time.perf_counter() - swap_started) * 1e6
        self.rollouts[name] = state_rollout
        self._note_stable(current, aliases)
        took = (time.perf_counter() - started) * 1000
        before, after = asdict(current.aliases), asdict(aliases)
        if self._on_change is not None:
            self._on_change(name, action)
        self.record(actor, name, action, before, after, reason=reason,
                    timing={"took_ms": round(took, 3), "stored_ms": round(stored_ms, 3), "swap_us": round(swap_us, 1)},
                    extra=extra)
        return Change(name, action, before, after, round(took, 3), dict(extra or {}))

    async def _save_locked(self, current: ServedModel, aliases: Aliases, rollout: RolloutState | None,
                           unloaded: tuple[str, ...]) -> None:
        """Store a model's new state (Conflict when another replica changed it first, StoreFailed when it
        cannot be stored: nothing changed either way)."""
        name = current.name
        if name in self.diverged and self.store.shared:
            raise Conflict(f"this replica cannot follow the shared state of {name}: {self.diverged[name]}; "
                           "make it serve that version (load it) or make the change on a replica that does")
        state = ModelState(aliases, _routing_of(current), rollout, self._clock(), unloaded)
        try:
            if self.store.shared:  # a network store may hang up to its timeout: never on the loop
                await asyncio.to_thread(self.store.save, name, state, self._seen_at.get(name))
            else:
                # On the loop, not in a thread: the write is ~1 ms (fsync included) and admin changes are
                # rare, while a thread hop under load would wait behind every queued request callback.
                self.store.save(name, state)
        except StaleState as exc:
            raise Conflict(str(exc)) from None
        except OSError as exc:
            raise StoreFailed(f"cannot store the change ({exc}); nothing was changed") from None
        self._seen_at[name] = state.updated_at
        self.unloaded[name] = unloaded

    def record(self, actor: str, model: str, action: str, before: Any, after: Any, reason: str = "",
               timing: dict[str, float] | None = None, extra: dict[str, Any] | None = None) -> None:
        """Log one decision with its actor, time, before and after (kept in memory and in events.jsonl)."""
        event = {"time": self._clock(), "actor": actor, "model": model, "action": action, "before": before,
                 "after": after, "reason": reason, **(timing or {}), **(extra or {})}
        self.events.append(event)
        if self.on_record is not None:
            self.on_record({"kind": "control", **event})
        log.info("control %s by %s on %s: %s -> %s %s", action, actor, model, before, after, reason)
        if self._events_file is not None:
            try:
                self._events_file.parent.mkdir(parents=True, exist_ok=True)
                with self._events_file.open("a") as handle:
                    handle.write(json.dumps(event, default=str) + "\n")
            except OSError as exc:
                log.error("cannot append to %s: %s", self._events_file, exc)

    def _model(self, name: str) -> ServedModel:
        return self._get().model(name)

    def _rollout_active(self, model: str) -> bool:
        rollout = self.rollouts.get(model)
        return rollout is not None and rollout.active

    @staticmethod
    def require_serving(model: ServedModel, version: str) -> None:
        """VersionNotFound, or Conflict when the version exists but does not serve."""
        model.entry(version)
        if version not in model.served:
            raise Conflict(f"version {version!r} of {model.name!r} is not serving "
                           f"({model.version_reasons.get(version, 'not loaded')}); load it first")


def _why_not(reports: list[dict[str, Any]], version: str, model_sha: str, policy_sha: str) -> str:
    """The nearest stored report, when one explains the refusal (e.g. the policy changed since)."""
    mine = [r for r in reports if r["version"] == version]
    exact = next((r for r in mine if (r["model_sha256"], r["policy_sha256"]) == (model_sha, policy_sha)), None)
    if exact is not None:
        return f" (its newest report {exact['sha256'][:12]} is not ready: score {exact['score']}, band {exact['band']})"
    same_file = next((r for r in mine if r["ready"] and r["model_sha256"] == model_sha), None)
    if same_file is not None:
        return (f" (report {same_file['sha256'][:12]} passed for policy {same_file['policy_sha256'][:12]}: "
                f"the policy changed since)")
    other_file = next((r for r in mine if r["ready"]), None)
    if other_file is not None:
        return (f" (report {other_file['sha256'][:12]} passed for another model file, "
                f"{other_file['model_sha256'][:12]})")
    return ""


def _unloading(model: ServedModel, versions: tuple[str, ...] | list[str]) -> ServedModel:
    """The model without the given versions serving (reason `unloaded`); aliases' versions are kept."""
    targets = [v for v in versions if v in model.versions and not model.aliases.referencing(v)]
    if not targets:
        return model
    served = {v: s for v, s in model.served.items() if v not in targets}
    return replace(model, served=served, version_reasons={**model.version_reasons, **dict.fromkeys(targets,
                                                                                                   "unloaded")})


def _routing_of(model: ServedModel) -> str:
    routing = model.policy.policy.routing.model_dump() if model.policy else {}
    return routing_hash(routing)
