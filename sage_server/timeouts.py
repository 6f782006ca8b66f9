"""Deadlines: a small hierarchy of time limits, enforced with anyio cancel scopes."""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import anyio

from sage_server.config import Settings
from sage_server.errors import Timeout

T = TypeVar("T")

Level = Literal["cache", "read", "search", "context", "complex"]
LEVELS: tuple[Level, ...] = get_args(Level)


@dataclass(frozen=True)
class Deadlines:
    """The limit, in seconds, of each level: cache lookup < document read < search < context < complex work."""

    cache: float = 0.1
    read: float = 0.5
    search: float = 2.0
    context: float = 5.0
    complex: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Deadlines:
        """The limits configured by the `timeout_*_ms` settings."""
        return cls(
            cache=settings.timeout_cache_ms / 1000,
            read=settings.timeout_read_ms / 1000,
            search=settings.timeout_search_ms / 1000,
            context=settings.timeout_context_ms / 1000,
            complex=settings.timeout_complex_ms / 1000,
        )

    def seconds(self, level: Level) -> float:
        """The limit of `level` in seconds."""
        limit: float = getattr(self, level)
        return limit

    @contextmanager
    def limit(self, level: Level, operation: str) -> Iterator[anyio.CancelScope]:
        """Run the block under the `level` limit; past it, cancel the block and raise `Timeout`.

        An enclosing, tighter deadline still wins: its own scope reports it, not this one.
        """
        seconds = self.seconds(level)
        # move_on_after plus cancelled_caught, not fail_after: a TimeoutError raised *inside* the block
        # (a socket timeout, say) is not ours to relabel.
        with anyio.move_on_after(seconds) as scope:
            yield scope
        if scope.cancelled_caught:
            raise Timeout(
                f"{operation} did not finish within its {level} limit of {_ms(seconds)} ms",
                operation=operation,
                level=level,
                limit_ms=_ms(seconds),
            )

    async def run(self, level: Level, operation: str, awaitable: Awaitable[T]) -> T:
        """Await one awaitable under the `level` limit (see `limit`)."""
        with self.limit(level, operation):
            result = await awaitable
        return result

    @contextmanager
    def partial(self, level: Level, operation: str) -> Iterator[PartialWindow]:
        """Run the block under the `level` limit; past it, stop the block quietly and mark the window partial.

        The caller keeps whatever it collected before the deadline and returns it with `window.reason`::

            found = []
            with deadlines.partial("context", "sage_context") as window:
                for doc in candidates:
                    found.append(await load(doc))
            return Answer(items=found, partial=window.partial, reason=window.reason)
        """
        seconds = self.seconds(level)
        window = PartialWindow(scope=anyio.move_on_after(seconds))
        with window.scope:
            yield window
        if window.scope.cancelled_caught:
            window.reason = f"{operation} stopped at its {level} limit of {_ms(seconds)} ms"


@dataclass
class PartialWindow:
    """The cancel scope of a `Deadlines.partial` block and, after it, why the result is incomplete (if it is)."""

    scope: anyio.CancelScope
    reason: str | None = None

    @property
    def partial(self) -> bool:
        """True when the deadline cut the block short."""
        return self.reason is not None


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
