"""Rate limits per caller: at most N requests in any minute (a moving window) per key, or per client address for
requests without one; shared by every instance through Redis when SAGE_REDIS_URL is set, kept in this process while
Redis cannot answer. Probes and the OAuth metadata document are never limited.

The shared window is the `limits` library's moving window, run in Redis by its redis-py implementation
(`implementation="redispy"`): the project keeps one Redis client library, and `limits`' default async client,
coredis, is never imported. Its in-process storages do not fit a server (the async one starts a task and a thread hop
per key to expire entries, neither bounds its keys), so the in-process window is the small `LocalWindows` below.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

import anyio
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from sage_server.auth import Principal
from sage_server.breaker import BreakerState, CircuitBreaker
from sage_server.config import Settings
from sage_server.errors import ConfigError, RateLimited
from sage_server.logs import get_logger, log_event

log = get_logger("ratelimit")
PERIOD_SECONDS: Final = 60.0
BREAKER_NAME: Final = "redis_ratelimit"


class LocalWindows:
    """The moving window in this process: each key keeps the times of its hits in the last period, at most `limit`
    of them. Keys idle for a whole period are dropped as new hits arrive, and at most `max_keys` are kept (the least
    recently seen go first), so memory follows the traffic of the last minute."""

    def __init__(
        self,
        limit: int,
        period: float = PERIOD_SECONDS,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.period = period
        self.max_keys = max_keys
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}  # in least-recently-seen order: a hit moves its key to the end

    def hit(self, key: str) -> float:
        """Count a hit for `key` if the window has room: 0.0, else the seconds until it has (nothing counted)."""
        now = self._clock()
        times = self._take(key, now)
        if len(times) >= self.limit:
            self._hits[key] = times
            return max(self.period - (now - times[0]), 0.001)
        times.append(now)
        self._hits[key] = times
        return 0.0

    def record(self, key: str) -> None:
        """Count a hit the shared window allowed, so that this process knows it if Redis fails later."""
        now = self._clock()
        times = self._take(key, now)
        times.append(now)  # a full deque drops its oldest: the window holds `limit` at most
        self._hits[key] = times

    def __len__(self) -> int:
        return len(self._hits)

    def _take(self, key: str, now: float) -> deque[float]:
        cutoff = now - self.period
        times = self._hits.pop(key, None)
        if times is None:
            times = deque(maxlen=self.limit)
        while times and times[0] <= cutoff:
            times.popleft()
        # The least recently seen keys lead the dict: drop the first two if idle a whole period (or over the cap),
        # which keeps the cleaning at O(1) a hit.
        for _ in range(2):
            oldest = next(iter(self._hits), None)
            if oldest is None:
                break
            idle = not self._hits[oldest] or self._hits[oldest][-1] <= cutoff
            if not idle and len(self._hits) < self.max_keys:
                break
            del self._hits[oldest]
        return times


class SharedWindows:
    """The moving window in Redis (one list of hit times per key, trimmed to the limit and expiring with the period),
    checked and updated in one Lua script by `limits`, so instances racing on one key never pass more than the
    limit between them. Hit times are the instances' wall clocks: keep them in sync (NTP)."""

    def __init__(self, url: str, *, namespace: str, limit: int, socket_timeout: float) -> None:
        # Our own pool (closed in `aclose`); no retries inside redis-py: a failure falls back to this process at once.
        self._pool = ConnectionPool.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, retry=Retry(NoBackoff(), 0)
        )
        storage = RedisStorage(
            # The connection comes from the pool (built from `url` by redis-py, which reads every form it allows:
            # unix sockets, users, no port); `limits` is given only its scheme, which picks its Redis code.
            "async+redis://",
            implementation="redispy",
            key_prefix=f"{namespace}:ratelimit",
            connection_pool=self._pool,  # type: ignore[arg-type]  # documented; its annotation lists scalars only
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self._item = RateLimitItemPerMinute(limit)

    async def hit(self, key: str) -> float:
        """Count a hit for `key` if the window has room: 0.0, else the seconds until it has."""
        if await self._limiter.hit(self._item, key):
            return 0.0
        stats = await self._limiter.get_window_stats(self._item, key)
        return max(stats.reset_time - time.time(), 0.001)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._pool.disconnect()


class RateLimiter:
    """The limit every instance applies: the shared window while Redis answers within the deadline, this process's
    window otherwise. Redis sits behind a circuit breaker, so a dead server costs one failed call per probe, not one
    per request; every hit Redis allowed is also counted here, so a client over its limit stays limited when Redis
    fails (on each instance, for what that instance saw)."""

    def __init__(
        self,
        limit: int,
        *,
        shared: SharedWindows | None = None,
        breaker: CircuitBreaker | None = None,
        deadline: float = 0.1,
    ) -> None:
        self.limit = limit
        self.local = LocalWindows(limit)
        self.shared = shared
        self.breaker = breaker
        self.deadline = deadline

    @classmethod
    def from_settings(
        cls, settings: Settings, on_breaker: Callable[[str, BreakerState], None] | None = None
    ) -> RateLimiter:
        """The limiter `rate_limit_per_minute` asks for, shared through `redis_url` when it is set."""
        deadline = settings.timeout_cache_ms / 1000
        if not settings.redis_url:
            return cls(settings.rate_limit_per_minute, deadline=deadline)

        def changed(name: str, state: BreakerState) -> None:
            if state == "open":
                log_event(
                    log, logging.WARNING, "Rate limits kept in this process: Redis is not answering", component=name
                )
            elif state == "closed":
                log_event(log, logging.INFO, "Rate limits shared through Redis again", component=name)
            if on_breaker is not None:
                on_breaker(name, state)

        try:
            shared = SharedWindows(
                settings.redis_url,
                namespace=settings.cache_namespace,
                limit=settings.rate_limit_per_minute,
                socket_timeout=max(1.0, 2 * deadline),
            )
        except ValueError as exc:  # redis-py names the schemes it reads
            raise ConfigError(f"SAGE_REDIS_URL: {exc}") from exc
        breaker = CircuitBreaker.from_settings(BREAKER_NAME, settings, on_change=changed)
        return cls(settings.rate_limit_per_minute, shared=shared, breaker=breaker, deadline=deadline)

    async def hit(self, key: str) -> float:
        """Count a request for `key`: 0.0 if it may go ahead, else the seconds until it may."""
        if self.shared is not None and self.breaker is not None and self.breaker.allow():
            try:
                with anyio.fail_after(self.deadline):
                    wait = await self.shared.hit(key)
            except (RedisError, OSError, TimeoutError) as exc:
                self.breaker.failure()
                log_event(log, logging.DEBUG, "Shared rate limit unavailable", error=f"{type(exc).__name__}: {exc}")
            else:
                self.breaker.success()
                if not wait:
                    self.local.record(key)
                return wait
        return self.local.hit(key)

    async def aclose(self) -> None:
        """Close the Redis connections, if any."""
        if self.shared is not None:
            await self.shared.aclose()


class LimitObserver(Protocol):
    """Hears of each request refused for its rate (the metrics count them by key name)."""

    def rate_limited(self, key: str) -> None: ...


def limit_key(principal: Principal, client: str) -> str:
    """Whose window a request counts in: its key's (every request with that key, from anywhere), or its client
    address's when it presents none."""
    return f"client:{client}" if principal.anonymous else f"key:{principal.name}"


class RateLimit:
    """429 with Retry-After once a caller is over its limit. It runs behind the front door, which names the caller;
    the routes the front door leaves open (probes, the OAuth metadata) carry no principal and are never limited."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, observer: LimitObserver | None = None) -> None:
        self.app = app
        self.limiter = limiter
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope.get("state", {}).get("principal") if scope["type"] == "http" else None
        if not isinstance(principal, Principal):
            await self.app(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else "unknown"
        wait = await self.limiter.hit(limit_key(principal, client))
        if wait:
            if self.observer is not None:
                self.observer.rate_limited(principal.name)
            seconds = max(1, math.ceil(wait))
            who = f"client {client}" if principal.anonymous else f"key {principal.name!r}"
            raise RateLimited(
                f"too many requests from {who} (limit {self.limiter.limit} a minute); retry after {seconds} s",
                headers={"Retry-After": str(seconds)},
                limit_per_minute=self.limiter.limit,
                retry_after=seconds,
            )
        await self.app(scope, receive, send)
