"""Generation watcher: tell other instances sharing a Redis that a write bumped the generation."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from types import TracebackType

import anyio
import anyio.abc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sage_server.cache import FaultLog
from sage_server.config import Settings
from sage_server.logs import get_logger, log_event

logger = get_logger("generation")

# Keep the highest generation in a key (so a subscriber that was away catches up) and announce it.
_PUBLISH = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
return redis.call('PUBLISH', ARGV[2], ARGV[3])
"""


class GenerationWatcher:
    """Publish this instance's generation after each write; report newer generations of other instances.

    Bound: while Redis is reachable, another instance's write reaches `on_generation` within one Redis
    round trip (milliseconds). A subscriber that lost Redis reconnects every `reconnect_seconds` and then
    reads the highest generation stored, so a write published while it was away arrives within
    `reconnect_seconds` (0.5 s) of Redis being reachable again: under 1 s in all, Redis permitting.
    While Redis is down nothing arrives and nothing fails: `publish` returns at once and the subscriber
    retries quietly (one log line per outage), so the service's own SQLite poll must cover that time.
    Without `redis_url` the watcher does nothing. Use it as `async with GenerationWatcher(...) as watcher:`
    (or enter it on the service's AsyncExitStack): its subscriber task lives in a task group that must be
    left in the task that entered it, after anything entered later.
    """

    def __init__(
        self,
        settings: Settings,
        database_id: str,
        on_generation: Callable[[int], None],
        *,
        reconnect_seconds: float = 0.5,
    ) -> None:
        # Per database: generations of two databases sharing a Redis (and a namespace) mean nothing to each other.
        self.channel = self.key = f"{settings.cache_namespace}:{database_id}:generation"
        self.instance = uuid.uuid4().hex
        self.newest = 0
        self.connected = False
        self._url = settings.redis_url
        self._limit = settings.timeout_cache_ms / 1000
        self._on_generation = on_generation
        self._reconnect_seconds = reconnect_seconds
        self._client: Redis | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._faults = FaultLog("generation", "other instances' writes wait for the database poll")

    async def start(self) -> None:
        """Start the subscriber task (no-op without Redis); `close()` it from the same task, in LIFO order."""
        if self._url is None:
            return
        socket_timeout = max(1.0, 2 * self._limit)
        self._client = Redis.from_url(self._url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        self._tasks.start_soon(self._subscribe_forever)

    async def close(self) -> None:
        """Stop the subscriber and close the connections."""
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()
            await self._tasks.__aexit__(None, None, None)
            self._tasks = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> GenerationWatcher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def publish(self, generation: int) -> None:
        """Announce `generation` after a write; best effort, within the cache deadline, never raises."""
        self.newest = max(self.newest, generation)
        if self._client is None or not self.connected:
            return
        with anyio.move_on_after(self._limit) as scope:
            try:
                await self._client.eval(
                    _PUBLISH, 1, self.key, generation, self.channel, f"{generation} {self.instance}"
                )
            except (RedisError, OSError) as exc:
                self._faults.fault("error", exc)
                return
        if scope.cancelled_caught:
            self._faults.fault("timeout", None)

    async def _subscribe_forever(self) -> None:
        while True:
            try:
                await self._subscribe()
            except (RedisError, OSError) as exc:
                self._faults.fault("error", exc)
            self.connected = False
            await anyio.sleep(self._reconnect_seconds)

    async def _subscribe(self) -> None:
        assert self._client is not None
        async with self._client.pubsub() as pubsub:
            await pubsub.subscribe(self.channel)
            self.connected = True
            self._faults.ok()
            stored = await self._client.get(self.key)
            if stored is not None:
                self._receive(stored)
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if message is not None and message["type"] == "message":
                    self._receive(message["data"])

    def _receive(self, data: bytes | str) -> None:
        # A message is "<generation> <instance>"; the stored key holds the bare generation.
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        generation, _, sender = text.partition(" ")
        if sender == self.instance:
            return
        try:
            self._see(int(generation))
        except ValueError:
            log_event(logger, logging.WARNING, "ignored a malformed generation message", data=repr(data[:100]))

    def _see(self, generation: int) -> None:
        if generation <= self.newest:
            return
        self.newest = generation
        try:
            self._on_generation(generation)
        # The subscriber must outlive a faulty callback; the service's poll will catch up.
        except Exception:
            logger.exception("generation callback failed")
