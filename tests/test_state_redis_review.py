"""Review of the shared (Redis) control state: defects demonstrated against a real redis-server.

Each test here was written as a strict xfail demonstrating a defect a review found, and lost its marker
when the defect was fixed: they now guard against it coming back.
Replicas are real `Gateway` objects (the real models, policies, ReleaseControl, RolloutController and
RedisStateStore) in one process and one event loop; where a test needs to control *when* a replica
hears of another's change (the pub/sub latency window that exists in production), it stops that
replica's StateWatcher and calls `apply_shared` itself, which is exactly what the watcher calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from gateway.app import Gateway
from gateway.control import Conflict
from gateway.settings import Settings
from gateway.state import ModelState
from gateway.state_redis import RedisStateStore, StateWatcher
from tests.conftest import MODEL
from tests.test_state_redis import RedisServer, redis_server  # noqa: F401  (the fixture)


@contextlib.asynccontextmanager
async def _replica(repo: tuple[Path, Path], url: str, tmp: Path, name: str,
                   watch: bool = False) -> AsyncIterator[Gateway]:
    models, policies = repo
    gateway = Gateway(Settings(models_dir=models, policies_dir=policies, state_dir=tmp / f"state-{name}",
                               audit_dir=tmp / f"audit-{name}", state_store="redis", redis_url=url))
    try:
        await gateway.load()
    except BaseException:
        with contextlib.suppress(Exception):
            await gateway.stop()  # release what a half-done start opened (audit file, threads)
        raise
    if not watch and gateway.state_watcher is not None:
        await gateway.state_watcher.close()  # this test decides when the replica hears of changes
    try:
        yield gateway
    finally:
        await gateway.stop()


def _aliases(gateway: Gateway) -> tuple[str | None, str | None, str | None]:
    a = gateway.snapshot.models[MODEL].aliases
    return a.stable, a.canary, a.shadow


def _stored(gateway: Gateway) -> tuple[str | None, str | None, str | None]:
    state = gateway.state_store.load(MODEL)
    assert state is not None
    return state.aliases.stable, state.aliases.canary, state.aliases.shadow


# --- 1. lost updates between replicas -------------------------------------------------------------------


def test_a_switch_on_one_replica_is_not_lost_to_a_concurrent_change_on_another(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a") as a, \
                _replica(ungated_repo, redis_server.url, tmp_path, "b") as b:
            await a.control.switch(MODEL, "2", "ops-a")  # answered 200: stable is 2
            # B has not heard of it yet (pub/sub is asynchronous): an admin sets a shadow on B
            with contextlib.suppress(Conflict):  # refused: B's table is stale (the compare-and-set)
                await b.control.set_shadow(MODEL, "2", 10.0, "ops-b")
            await a.control.apply_shared(MODEL)  # what A's watcher does within a second
            # Either B's change is refused (conflict) or it is applied on top of the switch;
            # never may the acknowledged switch silently vanish from the fleet.
            assert _stored(a)[0] == "2", f"Redis holds {_stored(a)}: the switch to 2 was lost"
            assert _aliases(a)[0] == "2", f"replica A now serves {_aliases(a)}"

    asyncio.run(scenario())


# --- 2. a re-read that started before a local change reverts it ----------------------------------------


def test_a_resync_racing_a_local_switch_does_not_revert_it(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a") as a:
            store = a.state_store
            assert isinstance(store, RedisStateStore)
            read, go = threading.Event(), threading.Event()
            real_load = store.load

            # the watcher's periodic re-read, slow to come back (Redis latency)
            def slow_load(model: str) -> ModelState | None:
                state = real_load(model)
                read.set()
                go.wait(5)
                return state

            store.load = slow_load  # type: ignore[method-assign]
            resync = asyncio.create_task(a.control.apply_shared(MODEL))
            await asyncio.to_thread(read.wait, 5)
            store.load = real_load  # type: ignore[method-assign]
            await a.control.switch(MODEL, "2", "ops")  # acknowledged: stable is 2
            go.set()
            await resync
            assert _stored(a)[0] == "2"
            assert _aliases(a)[0] == "2", f"the replica reverted its own switch: serves {_aliases(a)}"
            assert not any(e["action"] == "synced" for e in a.control.events)

    asyncio.run(scenario())


# --- 3. Redis back without its data: the first replica to start resets the fleet ------------------------


def test_redis_coming_back_empty_does_not_let_a_new_replica_undo_a_switch(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a", watch=True) as a:
            await a.control.switch(MODEL, "2", "ops")
            redis_server.stop()  # this server keeps nothing across restarts
            await asyncio.sleep(1.5)
            redis_server.start()
            await asyncio.sleep(2.5)  # A's watcher reconnects and re-reads ("reconciles")
            assert _aliases(a)[0] == "2"
            async with _replica(ungated_repo, redis_server.url, tmp_path, "c"):  # a new pod starts
                await asyncio.sleep(2.0)  # A's watcher applies what C stored
                assert _aliases(a)[0] == "2", f"replica A was reset to the policy's routing: {_aliases(a)}"

    asyncio.run(scenario())


# --- 4. the watcher outlives the rollout controller at shutdown ----------------------------------------


def test_a_change_adopted_during_shutdown_does_not_relaunch_a_rollout(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a") as a:
            await a.rollouts.start(MODEL, "2", "ops")
            assert a.rollouts.driving(MODEL)
            await a.rollouts.close()  # first step of Gateway.stop: tasks cancelled, the lease handed over
            lease = f"gateway:lease:rollout:{MODEL}"
            client = redis.Redis.from_url(redis_server.url)
            assert client.get(lease) is None
            # meanwhile (the watcher is still running) another replica records rollout progress
            state = a.state_store.load(MODEL)
            assert state is not None and state.rollout is not None
            a.state_store.save(MODEL, replace(state, rollout=replace(state.rollout, reason="x"),
                                              updated_at=time.time()), state.updated_at)  # as another replica
            await a.control.apply_shared(MODEL)  # what the still-running watcher does
            await asyncio.sleep(0.3)
            live = [t for t in a.rollouts._tasks.values() if not t.done()]
            holder = client.get(lease)
            client.close()
            for task in live:  # do not leak it out of this test
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert not live, "a rollout task was launched after the controller was closed"
            assert holder is None, "the closed replica took the rollout lease again"

    asyncio.run(scenario())


def test_aborting_a_rollout_on_its_driver_hands_the_lease_back(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a") as a:
            await a.rollouts.start(MODEL, "2", "ops")
            await asyncio.sleep(0.2)
            await a.rollouts.abort(MODEL, "ops")
            await asyncio.sleep(0.2)
            client = redis.Redis.from_url(redis_server.url)
            holder = client.get(f"gateway:lease:rollout:{MODEL}")
            client.close()
            assert not a.rollouts.driving(MODEL), "status says driven_here for an aborted rollout"
            assert holder is None, "the lease of an aborted rollout is still held"

    asyncio.run(scenario())


# --- 5. a stable version this replica cannot serve is adopted blindly ---------------------------------


def test_a_replica_does_not_adopt_a_stable_version_it_does_not_serve(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a") as a, \
                _replica(ungated_repo, redis_server.url, tmp_path, "b") as b:
            # a fault injected on B only: its version 2 did not load (say, another file on its disk)
            model = b.snapshot.models[MODEL]
            b.publish(replace(b.snapshot, models={**b.snapshot.models, MODEL: replace(
                model, served={v: s for v, s in model.served.items() if v != "2"},
                version_reasons={**model.version_reasons, "2": "refused: not the card's file"})}))
            await a.control.switch(MODEL, "2", "ops-a")
            await b.control.apply_shared(MODEL)
            served = b.snapshot.models[MODEL]
            assert served.routable, f"replica B adopted {served.aliases} and cannot route: {served.not_ready_reason}"

    asyncio.run(scenario())


# --- 6. malformed data in Redis -------------------------------------------------------------------------


def test_a_malformed_breaker_message_does_not_lose_the_next_trip(redis_server: RedisServer) -> None:  # noqa: F811
    async def scenario() -> None:
        store = RedisStateStore(redis_server.url, "t")
        trips: list[tuple[str, str]] = []

        async def apply(model: str) -> None:
            return None

        def trip(model: str, version: str) -> bool:
            trips.append((model, version))
            return True

        watcher = StateWatcher(store, lambda: [], apply, trip=trip)
        watcher.start()
        client = redis.Redis.from_url(redis_server.url)
        try:
            deadline = time.monotonic() + 5
            while client.pubsub_numsub(store.breaker_channel)[0][1] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            client.publish(store.breaker_channel, b"\xff\xfe garbage")
            client.publish(store.breaker_channel, json.dumps({"breaker": f"{MODEL}/2", "origin": "elsewhere"}))
            await asyncio.sleep(2.5)
            assert trips == [(MODEL, "2")], "the trip announced after a malformed message was lost"
        finally:
            client.close()
            await watcher.close()
            store.close()

    asyncio.run(scenario())


def test_garbage_under_the_state_key_does_not_stop_a_replica_from_starting(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    client = redis.Redis.from_url(redis_server.url)
    client.set(f"gateway:state:{MODEL}", "[" * 100_000)
    client.close()

    async def scenario() -> None:
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a") as a:
            assert _aliases(a)[0] == "1"

    asyncio.run(scenario())


def test_a_driver_whose_step_write_meets_a_newer_shared_state_follows_it_and_does_not_roll_back(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    from tests.conftest import patch_policy

    patch_policy(ungated_repo[1], MODEL, rollout={"steps": [10, 50, 100], "interval_s": 0.3, "min_requests": 1,
                                                  "rollback_if": {"p99_ratio_gt": None, "drift_alert": False}})

    async def scenario() -> None:
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a") as a, \
                _replica(ungated_repo, redis_server.url, tmp_path, "b") as b:
            await a.rollouts.start(MODEL, "2", "ops")
            await b.control.apply_shared(MODEL)  # B follows the rollout (A's watcher is off: A will not)
            await b.control.set_shadow(MODEL, "1", 5.0, "ops-b")  # stored: A's next step write is now stale
            for _ in range(30):  # A judges its steps on its own traffic (none needed: min 1, fake a call)
                a.stats.record(MODEL, "2", 0.001, False, False)
                await asyncio.sleep(0.1)
            state = a.state_store.load(MODEL)
            assert state is not None and state.rollout is not None
            assert state.rollout.status != "rolled_back", state.rollout.reason
            assert state.aliases.shadow == "1"  # B's change kept
            assert state.rollout.step >= 1 or state.rollout.status == "completed"  # A went on driving it

    asyncio.run(scenario())


# --- 7. shared unloads and loads (second review) ---------------------------------------------------------


def _own_repo(repo: tuple[Path, Path], tmp: Path, name: str, broken: str | None = None) -> tuple[Path, Path]:
    """A replica's own copy of the repository; `broken`: a version whose file differs from its card here."""
    import shutil

    models = shutil.copytree(repo[0], tmp / f"models-{name}")
    if broken is not None:
        onnx = models / MODEL / broken / "model.onnx"
        onnx.write_bytes(onnx.read_bytes() + b"x")  # a fault injected on this replica's disk
    return models, repo[1]


def _served(gateway: Gateway) -> list[str]:
    return sorted(gateway.snapshot.models[MODEL].served)


def test_a_load_refused_here_changes_nothing_for_the_fleet(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        async with _replica(_own_repo(ungated_repo, tmp_path, "a", broken="2"), redis_server.url, tmp_path,
                            "a") as a, _replica(ungated_repo, redis_server.url, tmp_path, "b") as b:
            await a.control.unload(MODEL, ["2"], "ops-a")
            await b.control.apply_shared(MODEL)
            assert _served(b) == ["1"]
            with pytest.raises(Conflict, match="refused"):
                await a.control.load(MODEL, ["2"], "ops-a")  # its file differs on A
            stored = a.state_store.load(MODEL)
            assert stored is not None and stored.unloaded == ("2",)  # the admin was told no: so is the fleet
            await b.control.apply_shared(MODEL)
            assert _served(b) == ["1"]

    asyncio.run(scenario())


def test_a_replica_that_cannot_follow_refuses_changes_instead_of_undoing_the_fleets(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        async with _replica(_own_repo(ungated_repo, tmp_path, "a", broken="2"), redis_server.url, tmp_path,
                            "a") as a, _replica(ungated_repo, redis_server.url, tmp_path, "b") as b:
            assert _served(a) == ["1"]  # A refused its version 2 at start
            await b.control.switch(MODEL, "2", "ops-b")
            await a.control.apply_shared(MODEL)
            assert _aliases(a)[0] == "1"  # A cannot serve the fleet's stable: it keeps its own
            assert "2" in a.control.diverged[MODEL]
            with pytest.raises(Conflict, match="cannot follow the shared state"):
                await a.control.set_shadow(MODEL, "1", 5.0, "ops-a")
            assert _stored(a)[0] == "2"  # the switch B acknowledged stands

    asyncio.run(scenario())


def test_a_state_from_a_gateway_without_the_unload_list_keeps_the_unloads(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    async def scenario() -> None:
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a") as a, \
                _replica(ungated_repo, redis_server.url, tmp_path, "b") as b:
            await a.control.unload(MODEL, ["2"], "ops-a")
            await b.control.apply_shared(MODEL)
            client = redis.Redis.from_url(redis_server.url)  # an older replica (rolling upgrade) sets a shadow
            key = a.state_store.key(MODEL)
            payload = json.loads(client.get(key))  # type: ignore[arg-type]
            del payload["unloaded"]
            payload["aliases"].update(shadow="1", shadow_percent=5.0)
            payload["updated_at"] = time.time()
            client.set(key, json.dumps(payload))
            client.close()
            await b.control.apply_shared(MODEL)
            assert _aliases(b)[2] == "1" and _served(b) == ["1"]  # followed, and version 2 stays out

    asyncio.run(scenario())


def test_a_routing_edit_keeps_unloads_of_versions_it_does_not_name(
        ungated_repo: tuple[Path, Path], redis_server: RedisServer, tmp_path: Path) -> None:  # noqa: F811
    from tests.conftest import patch_policy

    async def scenario() -> None:
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a") as a:
            await a.control.unload(MODEL, ["2"], "ops-a")
        patch_policy(ungated_repo[1], MODEL, routing={"stable": "1", "shadow_queue": 7})
        async with _replica(ungated_repo, redis_server.url, tmp_path, "a2") as again:
            assert _served(again) == ["1"]
            changed = [e for e in again.control.events if e["action"] == "policy_routing_changed"]
            assert changed and changed[-1]["unloaded"] == ["2"]

    asyncio.run(scenario())
