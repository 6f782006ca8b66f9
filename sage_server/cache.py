"""Cache tiers (memory, disk, Redis) behind one read-through layer that turns every fault into a miss."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Generic, Literal, Protocol, TypeVar, cast

import anyio
import anyio.abc
from aiocache import RedisCache  # type: ignore[import-untyped]  # aiocache 0.12 ships no type hints
from aiocache.serializers import NullSerializer  # type: ignore[import-untyped]
from redis.asyncio.connection import parse_url

from sage_server.breaker import BreakerState, CircuitBreaker
from sage_server.config import Settings
from sage_server.logs import get_logger, log_event

T = TypeVar("T")

TierName = Literal["memory", "disk", "redis"]
FaultKind = Literal["timeout", "error", "corrupt"]

logger = get_logger("cache")


class CacheObserver(Protocol):
    """Receives cache events, for metrics. A fault counts as an error *and* a miss of that tier."""

    def hit(self, tier: TierName) -> None: ...

    def miss(self, tier: TierName) -> None: ...

    def error(self, tier: TierName, kind: FaultKind) -> None: ...

    def breaker_state(self, name: str, state: BreakerState) -> None: ...


class NullObserver:
    """The default observer: ignores every event."""

    def hit(self, tier: TierName) -> None:
        pass

    def miss(self, tier: TierName) -> None:
        pass

    def error(self, tier: TierName, kind: FaultKind) -> None:
        pass

    def breaker_state(self, name: str, state: BreakerState) -> None:
        pass


class CorruptEntry(Exception):
    """A disk entry failed its checks (and has been removed)."""


class FaultLog:
    """Log the first fault of a burst, a reminder while it lasts, and the recovery; not every fault."""

    REMIND_SECONDS: Final = 60.0

    def __init__(
        self, what: str, consequence: str = "served as a miss", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.what = what
        self.consequence = consequence
        self._clock = clock
        self._faults = 0
        self._logged_at = 0.0

    def fault(self, kind: str, exc: BaseException | None) -> None:
        """Record one fault; log it if it starts a burst or the last line is old."""
        self._faults += 1
        now = self._clock()
        if self._faults == 1 or now - self._logged_at >= self.REMIND_SECONDS:
            self._logged_at = now
            message = f"{self.what} fault, {self.consequence}"
            # Not repr(): redis-py 8 exceptions' repr is only "network:ConnectionError", without the message.
            error = f"{type(exc).__name__}: {exc}" if exc is not None else None
            log_event(
                logger, logging.WARNING, message, component=self.what, kind=kind, error=error, faults=self._faults
            )

    def ok(self) -> None:
        """Record a success; it ends the burst, if there was one."""
        if self._faults:
            log_event(logger, logging.INFO, f"{self.what} recovered", component=self.what, faults=self._faults)
            self._faults = 0


class Memo(Generic[T]):
    """An in-process LRU of Python objects, bounded in entries and in the bytes `size` says each value holds: the
    memory tier's store, and (holding objects, with nothing to decode on a hit) what a context task gathered before
    packing (see KnowledgeService.context)."""

    def __init__(self, *, max_entries: int, max_bytes: int, size: Callable[[T], int]) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size = size
        self._entries: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> T | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def set(self, key: str, value: T) -> None:
        """Keep `value`, evicting the least recently used entries past the bounds (a value alone above the byte
        bound is not kept, and the key's older value is gone all the same)."""
        self.drop(key)
        size = self._size(value)
        if size > self.max_bytes:
            return
        self._entries[key] = (value, size)
        self.nbytes += size
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1][1]

    def drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]


class MemoryTier:
    """An in-process LRU bounded in entries and in value bytes, with a TTL per entry."""

    name: Final = "memory"

    def __init__(self, *, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: Memo[tuple[bytes, float]] = Memo(
            max_entries=max_entries, max_bytes=max_bytes, size=lambda entry: len(entry[0])
        )

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._entries.nbytes

    def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if expires_at <= self._clock():
            self._entries.drop(key)
            return None
        return value

    def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store `value` for `ttl` seconds, evicting the least recently used entries past the bounds."""
        self._entries.set(key, (value, self._clock() + ttl))


class Tier(Protocol):
    """A tier that does I/O: it may be slow or fail. It raises on a fault; None means a plain miss."""

    @property
    def name(self) -> TierName: ...

    async def start(self) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def close(self) -> None: ...


# An entry file: magic, expiry (Unix time), BLAKE2b digest of the value, then the value.
_HEADER = struct.Struct("!4sd16s")
_MAGIC = b"SGC1"
_TMP_PREFIX = ".tmp-"
_SUFFIX = ".bin"


class DiskTier:
    """Files under a directory that outlive the process: TTL, a size bound (least recently used go first,
    oldest written after a restart), atomic writes, and a damaged file is removed and reported as corrupt.

    File work runs in worker threads; an abandoned read or write finishes there harmlessly.
    """

    name: Final = "disk"

    def __init__(
        self, directory: Path, *, max_bytes: int, max_entries: int = 20_000, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        # The index of entries lives in memory (about 200 bytes each), so it is bounded in entries too.
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # file name -> size, least recently used first
        self.nbytes = 0

    async def start(self) -> None:
        """Create the directory and index the entries a previous run left."""
        await anyio.to_thread.run_sync(self._scan)

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired; raises CorruptEntry for a damaged file."""
        return await anyio.to_thread.run_sync(self._read, key, abandon_on_cancel=True)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Write the entry atomically (temporary file, then rename) and evict past the size bound."""
        await anyio.to_thread.run_sync(self._write, key, value, ttl, abandon_on_cancel=True)

    async def close(self) -> None:
        """Nothing to release: every file operation is complete on return."""

    def _file(self, key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest() + _SUFFIX

    def _scan(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        stale_tmp = self._clock() - 60
        for entry in os.scandir(self.directory):
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue  # removed meanwhile by another process sharing the folder
            if entry.name.startswith(_TMP_PREFIX):
                # Left by a crash mid-write; a young one may belong to a live process sharing the folder.
                if stat.st_mtime < stale_tmp:
                    Path(entry.path).unlink(missing_ok=True)
            elif entry.name.endswith(_SUFFIX):
                found.append((stat.st_mtime, entry.name, stat.st_size))
        with self._lock:
            self._index = OrderedDict((name, size) for _, name, size in sorted(found))
            self.nbytes = sum(self._index.values())
            self._evict()

    def _read(self, key: str) -> bytes | None:
        name = self._file(key)
        path = self.directory / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        magic, expires_at, digest = _HEADER.unpack_from(data) if len(data) >= _HEADER.size else (b"", 0.0, b"")
        value = data[_HEADER.size :]
        if magic != _MAGIC or hashlib.blake2b(value, digest_size=16).digest() != digest:
            self._remove(name)
            raise CorruptEntry(f"damaged cache file {path} removed")
        if expires_at <= self._clock():
            self._remove(name)
            return None
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
        return value

    def _write(self, key: str, value: bytes, ttl: float) -> None:
        size = _HEADER.size + len(value)
        if size > self.max_bytes:
            return
        header = _HEADER.pack(_MAGIC, self._clock() + ttl, hashlib.blake2b(value, digest_size=16).digest())
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=_TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(header)
                out.write(value)
            name = self._file(key)
            with self._lock:
                os.replace(tmp, self.directory / name)
                self.nbytes += size - self._index.pop(name, 0)
                self._index[name] = size
                self._evict()
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _remove(self, name: str) -> None:
        with self._lock:
            self.nbytes -= self._index.pop(name, 0)
            (self.directory / name).unlink(missing_ok=True)

    def _evict(self) -> None:
        # Called with the lock held.
        while (self.nbytes > self.max_bytes or len(self._index) > self.max_entries) and self._index:
            name, size = self._index.popitem(last=False)
            self.nbytes -= size
            (self.directory / name).unlink(missing_ok=True)


class RedisTier:
    """Redis through aiocache's RedisCache (raw bytes, keys under `namespace:`), shared by every instance.

    aiocache's own timeout is off: the caller's anyio deadline bounds each call. Socket timeouts are a
    backstop behind it, and redis-py's pool does not retry, so a dead server fails fast.
    """

    name: Final = "redis"

    def __init__(self, url: str, *, namespace: str, socket_timeout: float = 1.0) -> None:
        options: dict[str, Any] = dict(parse_url(url))  # ValueError names the allowed schemes
        self._cache: Any = RedisCache(
            serializer=NullSerializer(encoding=None),  # encoding None: values stay bytes both ways
            namespace=namespace,
            timeout=None,
            endpoint=options.pop("host", "127.0.0.1"),
            port=options.pop("port", 6379),
            db=options.pop("db", 0),
            password=options.pop("password", None),
            create_connection_timeout=socket_timeout,
            connection_pool_kwargs={**options, "socket_timeout": socket_timeout},
        )

    async def start(self) -> None:
        """Nothing to do: the pool connects on first use (the cache pings it in `TieredCache.start`)."""

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired."""
        return cast(bytes | None, await self._cache.get(key))

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store `value` with a TTL in whole seconds, rounded up."""
        await self._cache.set(key, value, ttl=max(1, math.ceil(ttl)))

    async def ping(self) -> None:
        """Raise unless the server answers."""
        await self._cache.raw("ping")

    async def reset(self) -> None:
        """Close the pool's idle connections; new ones are opened on demand. Connections that lived through a
        failure (a frozen server, a timeout mid-reply) may hold half-read replies or dead sockets. Connections
        busy with a command are left to finish it."""
        await self._cache.client.connection_pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._cache.close()


# What `TieredCache._call` returns when the tier gave no answer: it was not consulted (its breaker is open,
# or the lookup's deadline had passed), or it faulted.
_SKIPPED: Final = object()
_FAULT: Final = object()
# /health pings Redis itself, at most this often (answers in between reuse the last result).
HEALTH_CHECK_SECONDS: Final = 1.0


class TieredCache:
    """Read-through L1 memory -> L2 disk -> L3 Redis, with promotion into faster tiers on a hit.

    The cache is never the truth: a slow tier (past the cache deadline, `timeout_cache_ms`, which bounds a
    whole lookup) or a failing one is a miss, logged once per burst and counted through the observer;
    nothing but cancellation ever leaves `get` or `set`. Redis sits behind its own circuit breaker, and a
    background task probes it while it is down so it recovers without traffic. Use it as
    `async with TieredCache(settings) as cache:` (or enter it on the service's AsyncExitStack): that task
    lives in a task group that must be left in the task that entered it, after anything entered later.
    """

    def __init__(self, settings: Settings, *, observer: CacheObserver | None = None) -> None:
        self.observer: CacheObserver = observer or NullObserver()
        self.ttl = float(settings.cache_ttl_seconds)
        self.limit = settings.timeout_cache_ms / 1000
        self._start_limit = settings.timeout_complex_ms / 1000
        self.memory = (
            MemoryTier(max_entries=settings.cache_memory_entries, max_bytes=settings.cache_memory_bytes)
            if settings.cache_memory
            else None
        )
        self.tiers: list[Tier] = []
        if settings.cache_disk:
            self.tiers.append(
                DiskTier(
                    settings.cache_dir / "entries",
                    max_bytes=settings.cache_disk_bytes,
                    max_entries=settings.cache_disk_entries,
                )
            )
        self.redis: RedisTier | None = None
        self.redis_breaker: CircuitBreaker | None = None
        if settings.cache_redis and settings.redis_url:
            self.redis = RedisTier(
                settings.redis_url, namespace=settings.cache_namespace, socket_timeout=max(1.0, 2 * self.limit)
            )
            self.redis_breaker = CircuitBreaker.from_settings("redis", settings, on_change=self.observer.breaker_state)
            self.tiers.append(self.redis)
        self._faults = {tier.name: FaultLog(tier.name) for tier in self.tiers}
        self._redis_ok = True
        self._probe_every = min(1.0, settings.breaker_reset_seconds)
        self._tasks: anyio.abc.TaskGroup | None = None
        self._checked_at: float | None = None
        self._checking = False

    async def start(self) -> None:
        """Index the disk tier, ping Redis, start the Redis probe; `close()` from the same task, in LIFO order.

        Never fails: a tier that cannot start is a tier whose every call is a miss.
        """
        for tier in self.tiers:
            limit = self.limit if tier is self.redis else self._start_limit
            await self._call(tier, anyio.current_time() + limit, tier.start)
        if self.redis is not None:
            await self._call(self.redis, anyio.current_time() + self.limit, self.redis.ping)
            self._tasks = anyio.create_task_group()
            await self._tasks.__aenter__()
            self._tasks.start_soon(self._probe_redis)

    async def close(self) -> None:
        """Stop the probe and release the tiers."""
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()
            await self._tasks.__aexit__(None, None, None)
            self._tasks = None
        for tier in self.tiers:
            await self._call(tier, anyio.current_time() + self._start_limit, tier.close)

    async def __aenter__(self) -> TieredCache:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def get(self, key: str) -> bytes | None:
        """The cached value from the fastest tier that has it, or None (a miss, a slow or failing tier)."""
        if self.memory is not None:
            value = self.memory.get(key)
            if value is not None:
                self.observer.hit("memory")
                return value
            self.observer.miss("memory")
        deadline = anyio.current_time() + self.limit
        for index, tier in enumerate(self.tiers):
            found = await self._call(tier, deadline, tier.get, key)
            if found is _SKIPPED:
                continue
            if found is None or found is _FAULT:
                self.observer.miss(tier.name)
                continue
            value = cast(bytes, found)
            self.observer.hit(tier.name)
            if self.memory is not None:
                self.memory.set(key, value, self.ttl)
            for faster in self.tiers[:index]:
                await self._call(faster, deadline, faster.set, key, value, self.ttl)
            return value
        return None

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store `value` in every enabled tier (I/O tiers concurrently) for `ttl` seconds (default the setting)."""
        ttl = self.ttl if ttl is None else ttl
        if self.memory is not None:
            self.memory.set(key, value, ttl)
        deadline = anyio.current_time() + self.limit
        async with anyio.create_task_group() as group:
            for tier in self.tiers:
                group.start_soon(self._call, tier, deadline, tier.set, key, value, ttl)

    def health(self) -> Literal["healthy", "degraded"]:
        """Degraded while Redis is configured and its breaker is not closed or its last call failed."""
        if self.redis_breaker is None:
            return "healthy"
        return "healthy" if self._redis_ok and self.redis_breaker.state == "closed" else "degraded"

    async def check(self) -> Literal["healthy", "degraded"]:
        """`health()` after asking Redis itself, so that a dead Redis shows without traffic: a ping under the
        cache deadline, at most once every HEALTH_CHECK_SECONDS (concurrent checks share the one in progress).
        The ping counts like any call: a failure marks the tier down, and its breaker skips it when open."""
        if self.redis is None:
            return self.health()
        now = anyio.current_time()
        if not self._checking and (self._checked_at is None or now - self._checked_at >= HEALTH_CHECK_SECONDS):
            self._checking = True
            try:
                await self._call(self.redis, now + self.limit, self.redis.ping)
            finally:
                self._checking = False
                self._checked_at = anyio.current_time()
        return self.health()

    async def _call(self, tier: Tier, deadline: float, func: Callable[..., Awaitable[T]], *args: Any) -> T | object:
        """`func(*args)` under the deadline and the tier's breaker, or _SKIPPED, or _FAULT (logged and counted)."""
        breaker = self.redis_breaker if tier is self.redis else None
        if anyio.current_time() >= deadline or (breaker is not None and not breaker.allow()):
            return _SKIPPED
        kind: FaultKind
        error: BaseException | None = None
        with anyio.move_on_at(deadline) as scope:
            try:
                result = await func(*args)
            except CorruptEntry as exc:
                kind, error = "corrupt", exc
            # The cache is never the truth: whatever a tier raises is this layer's to absorb.
            except Exception as exc:
                kind, error = "error", exc
            else:
                self._faults[tier.name].ok()
                if breaker is not None:
                    self._redis_ok = True
                    if breaker.success():
                        await self._reset_redis()
                return result
        if scope.cancelled_caught:
            kind = "timeout"
        self.observer.error(tier.name, kind)
        self._faults[tier.name].fault(kind, error)
        if breaker is not None:
            breaker.failure()
            self._redis_ok = False
        return _FAULT

    async def _reset_redis(self) -> None:
        """Start the recovered Redis tier on fresh connections (a frozen-then-resumed server left the tier cold
        for seconds on its old ones). Under the caller's deadline; a failed reset leaves the pool as it was."""
        assert self.redis is not None
        try:
            await self.redis.reset()
        except Exception as exc:  # the cache is never the truth: nothing but cancellation leaves this layer
            log_event(logger, logging.WARNING, "Redis pool reset failed", component="redis", error=str(exc))

    async def _probe_redis(self) -> None:
        assert self.redis is not None and self.redis_breaker is not None
        while True:
            await anyio.sleep(self._probe_every)
            if not self._redis_ok or self.redis_breaker.state != "closed":
                await self._call(self.redis, anyio.current_time() + self.limit, self.redis.ping)
