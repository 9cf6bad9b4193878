"""Recent predictions shared through Redis, so a delayed label finds its prediction on any replica.

Behind a load balancer the label for a request rarely reaches the process that answered it. With
the Redis state store each process therefore also hands its predictions to Redis: the request path
only appends to a bounded buffer (full: the oldest is dropped and counted); a task writes the
buffer every `FLUSH_EVERY_S` in one round trip. Redis keeps, per model, the newest
`feedback.store` predictions (a hash by request id, and a list giving their order). A process that
receives a label for an id it does not know takes the prediction out of Redis atomically (so a
prediction is labelled once, wherever the label lands) and joins it into its own outcome window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import redis

log = logging.getLogger("gateway.feedback")

#: how often buffered predictions are written to Redis (a label sent sooner may not find them)
FLUSH_EVERY_S = 0.1
#: predictions waiting to be written; when full the oldest are dropped (and counted)
BUFFER = 50_000

#: add predictions: KEYS hash, order list; ARGV limit, then id, value pairs; the oldest beyond limit go
_ADD = """
local limit = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  if redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
  end
end
local extra = redis.call('LLEN', KEYS[2]) - limit
while extra > 0 do
  redis.call('HDEL', KEYS[1], redis.call('LPOP', KEYS[2]))
  extra = extra - 1
end
return 1
"""

#: take predictions: KEYS hash; ARGV ids; each found one is removed (a prediction is labelled once)
_TAKE = """
local found = {}
for i = 1, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  if value then
    redis.call('HDEL', KEYS[1], ARGV[i])
    found[#found + 1] = ARGV[i]
    found[#found + 1] = value
  end
end
return found
"""


class SharedPredictions:
    """The predictions of every process serving a model, in Redis (see the module docstring)."""

    def __init__(self, url: str, prefix: str, on_dropped: Callable[[str, int], None] | None = None,
                 timeout_s: float = 0.5) -> None:
        self.prefix = prefix
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._pending: deque[tuple[str, int, str, str, np.ndarray]] = deque()
        self._on_dropped = on_dropped
        self._task: asyncio.Task[None] | None = None

    def _keys(self, model: str) -> tuple[str, str]:
        return f"{self.prefix}:predictions:{model}", f"{self.prefix}:predictions:{model}:order"

    def offer(self, model: str, store: int, request_id: str, version: str, scores: np.ndarray) -> None:
        """Queue a prediction for Redis (request path: an append, never a wait)."""
        if len(self._pending) >= BUFFER:
            dropped = self._pending.popleft()
            if self._on_dropped is not None:
                self._on_dropped(dropped[0], 1)
        self._pending.append((model, store, request_id, version, scores))  # encoded off the loop, in _flush

    def start(self) -> None:
        """Start writing the buffer (on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def close(self) -> None:
        """Write what is buffered (best effort), then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._flush)
        self._client.close()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            if self._pending:
                try:
                    await asyncio.to_thread(self._flush)
                except Exception as exc:  # Redis away: those predictions cannot be labelled elsewhere
                    log.warning("cannot share predictions for feedback: %s", exc)

    def _flush(self) -> None:
        batch: dict[str, tuple[int, list[str]]] = {}
        while self._pending:
            model, store, request_id, version, scores = self._pending.popleft()
            entry = batch.setdefault(model, (store, []))
            entry[1].extend((request_id, json.dumps({"version": version, "scores": scores.tolist()})))
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for model, (store, pairs) in batch.items():
                    pipe.eval(_ADD, 2, *self._keys(model), store, *pairs)
                pipe.execute()
        except redis.RedisError:
            if self._on_dropped is not None:
                for model, (_, pairs) in batch.items():
                    self._on_dropped(model, len(pairs) // 2)
            raise

    def take(self, model: str, ids: list[str]) -> dict[str, tuple[str, np.ndarray]]:
        """Remove and return the predictions of these request ids that another process made (blocking:
        call from a thread). Redis away: none (the labels stay unknown), logged."""
        if not ids:
            return {}
        try:
            found: list[Any] = self._client.eval(_TAKE, 1, self._keys(model)[0], *ids)
        except redis.RedisError as exc:
            log.warning("cannot look up shared predictions of %s: %s", model, exc)
            return {}
        taken = {}
        for request_id, value in zip(found[::2], found[1::2], strict=True):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                document = json.loads(value)
                taken[request_id.decode() if isinstance(request_id, bytes) else str(request_id)] = (
                    str(document["version"]), np.asarray(document["scores"], dtype=np.float64))
        return taken

    def forget(self, model: str, ids: list[str]) -> None:
        """Remove predictions labelled here, so a copy in Redis cannot be labelled again elsewhere."""
        if ids:
            with contextlib.suppress(redis.RedisError):
                self._client.hdel(self._keys(model)[0], *ids)
