"""Control state shared by several replicas, in Redis: the alias table and rollout progress.

`RedisStateStore` keeps each model's state (the same JSON as the file store) under
`<prefix>:state:<model>` and announces every save on the channel `<prefix>:changes`, in one
transaction. `StateWatcher` runs on every replica: it listens on the channel and applies a change
within a loop turn, and re-reads every model once a second as a safety net (a message missed while
Redis or the connection was down). When Redis cannot be reached, saves raise (so an admin change
is refused, never half-applied), the replica keeps serving the state it last knew, and `/status`
reports the store degraded until Redis answers again, when the periodic re-read reconciles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from gateway.state import ModelState, StaleState, decode_state, encode_state

log = logging.getLogger("gateway.state_redis")

#: how long a Redis call may take before the store counts as unreachable
TIMEOUT_S = 0.5
#: the safety-net re-read of every model's state
RESYNC_EVERY_S = 1.0


#: take a free lease, or renew one this owner holds; 1 when held afterwards
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
#: delete a lease only if this owner holds it
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


#: seconds of silence after which the watcher's subscription is pinged
WATCH_HEALTH_CHECK_S = 5


class RedisStateStore:
    """Model state in Redis, shared by every replica pointing at the same URL and prefix."""

    kind = "redis"
    shared = True

    def __init__(self, url: str, prefix: str = "gateway") -> None:
        self.url = url
        self.prefix = prefix
        self.channel = f"{prefix}:changes"
        self.breaker_channel = f"{prefix}:breakers"
        self.origin = uuid.uuid4().hex
        """This replica's id on announcements (its own are not applied twice)."""
        self._client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self.ok = True
        self.error = ""
        self.since = time.time()

    def key(self, model: str) -> str:
        """The Redis key of one model's state."""
        return f"{self.prefix}:state:{model}"

    def load(self, model: str) -> ModelState | None:
        """The shared state (None when there is none, or Redis cannot be reached: logged, degraded)."""
        try:
            data = self._client.get(self.key(model))
        except redis.RedisError as exc:
            self.unreachable(exc)
            return None
        self._reached()
        if data is None:
            return None
        try:
            return decode_state(data)
        except Exception as exc:  # anything under the key (garbage, absurd nesting) must not stop a replica
            log.error("shared state of %s is unreadable (%s); starting from the policy's routing", model, exc)
            return None

    def save(self, model: str, state: ModelState, expect: float | None = None) -> None:
        """Store and announce a change in one transaction, only if the stored state is still the one this
        replica last saw (`expect`, its `updated_at`; none stored counts as seen): StaleState otherwise,
        OSError when Redis cannot take it."""
        key = self.key(model)
        try:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                current = pipe.get(key)
                if current is not None and _updated_at(current) != expect:
                    raise StaleState(f"another replica changed the state of {model} a moment ago; "
                                     f"this replica now follows it: look, then try again")
                pipe.multi()
                pipe.set(key, encode_state(state))
                pipe.publish(self.channel, model)
                pipe.execute()
        except redis.WatchError:
            raise StaleState(f"another replica changed the state of {model} while this change was being "
                             f"stored; nothing was changed: try again") from None
        except redis.RedisError as exc:
            self.unreachable(exc)
            failure = "refused the change" if isinstance(exc, redis.ResponseError) else "cannot be reached"
            raise OSError(f"the shared state store (Redis at {self._where()}) {failure}: {exc}") from None
        self._reached()

    def lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take the lease if free or renew it if `owner` holds it (atomically); False if another replica
        holds it, or Redis cannot be reached (then nobody can be sure to hold it: do not act)."""
        try:
            held = self._client.eval(_LEASE, 1, f"{self.prefix}:lease:{name}", owner, int(ttl_s * 1000))
        except redis.RedisError as exc:
            self.unreachable(exc)
            return False
        self._reached()
        return bool(held)

    def release(self, name: str, owner: str) -> None:
        """Give the lease up if `owner` holds it (at shutdown: another replica takes over at once)."""
        with contextlib.suppress(redis.RedisError):
            self._client.eval(_RELEASE, 1, f"{self.prefix}:lease:{name}", owner)

    def announce_trip(self, name: str) -> None:
        """Tell the other replicas that the breaker `model/version` tripped here (best effort: a replica
        that misses it trips on its own failures)."""
        try:
            self._client.publish(self.breaker_channel, json.dumps({"breaker": name, "origin": self.origin}))
        except redis.RedisError as exc:
            self.unreachable(exc)

    def status(self) -> dict[str, Any]:
        """For /status: where state lives and whether it can be reached (and since when not)."""
        return {"kind": self.kind, "ok": self.ok, "location": self._where(), "error": self.error or None,
                "since": self.since}

    def watcher_client(self) -> aioredis.Redis:
        """An asyncio client for the watcher's subscription."""
        # socket_timeout None: a subscription is quiet for long stretches. The health check pings an
        # idle subscription, so a connection that died silently (no reset) is noticed and replaced.
        return aioredis.Redis.from_url(self.url, socket_timeout=None, socket_connect_timeout=TIMEOUT_S,
                                       health_check_interval=WATCH_HEALTH_CHECK_S)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def _where(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def unreachable(self, exc: Exception) -> None:
        """Record that Redis could not be reached, or answered with an error (out of memory, a read-only
        replica): status degraded until the next call that works."""
        if self.ok:
            what = "answered with an error" if isinstance(exc, redis.ResponseError) else "unreachable"
            log.error("shared state store %s (%s): serving the last known state", what, exc)
            self.since = time.time()
        self.ok, self.error = False, str(exc)

    def _reached(self) -> None:
        if not self.ok:
            log.warning("shared state store reachable again (down %.1f s)", time.time() - self.since)
            self.since = time.time()
        self.ok, self.error = True, ""


class StateWatcher:
    """Applies other replicas' changes: on each announcement at once, and every model once a second."""

    def __init__(self, store: RedisStateStore, models: Callable[[], list[str]],
                 apply: Callable[[str], Awaitable[None]], trip: Callable[[str, str], Any] | None = None) -> None:
        self._store = store
        self._models = models
        self._apply = apply
        self._trip = trip
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching (on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client = self._store.watcher_client()
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self._store.channel, self._store.breaker_channel)
                    await self._resync()  # whatever changed while not subscribed
                    next_resync = loop.time() + RESYNC_EVERY_S
                    while True:
                        wait = max(0.0, next_resync - loop.time())
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                        if message is not None and message.get("type") == "message":
                            if _text(message.get("channel")) == self._store.breaker_channel:
                                self._tripped_elsewhere(message.get("data"))
                            else:
                                await self._apply_safely(_text(message.get("data")))
                        if loop.time() >= next_resync:
                            await self._resync()
                            next_resync = loop.time() + RESYNC_EVERY_S
            except (redis.RedisError, OSError) as exc:
                self._store.unreachable(exc)
                await asyncio.sleep(RESYNC_EVERY_S)
            except Exception:  # a bug must not end the watching: log it and subscribe again
                log.exception("the shared-state watcher failed; subscribing again")
                await asyncio.sleep(RESYNC_EVERY_S)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _tripped_elsewhere(self, data: Any) -> None:
        try:
            announced = json.loads(data)
            model, _, version = str(announced["breaker"]).partition("/")
            if announced.get("origin") != self._store.origin and self._trip is not None and self._trip(model, version):
                log.warning("circuit breaker %s/%s opened: it tripped on another replica", model, version)
        except Exception:  # a malformed announcement is dropped; the subscription must go on
            log.warning("ignoring a malformed breaker announcement: %r", repr(data)[:200])

    async def _resync(self) -> None:
        for model in self._models():
            await self._apply_safely(model)

    async def _apply_safely(self, model: str) -> None:
        try:
            await self._apply(model)
        except Exception:  # one model's bad state must not stop the watcher for the others
            log.exception("cannot apply the shared state of %s", model)


def _text(data: Any) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)


def _updated_at(data: bytes | str) -> float | None:
    """The `updated_at` of a stored state (None when it cannot be read: any expectation fails)."""
    try:
        return float(json.loads(data)["updated_at"])
    except Exception:
        return None
