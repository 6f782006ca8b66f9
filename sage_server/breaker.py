"""Circuit breaker: stop calling a failing dependency for a while, then let one probe call test it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from sage_server.config import Settings

BreakerState = Literal["closed", "open", "half_open"]
StateListener = Callable[[str, BreakerState], None]


class CircuitBreaker:
    """One breaker per dependency (never shared): closed -> open after `failures` faults in a row,
    open -> half-open after `reset_seconds`, half-open -> closed on a successful probe or back to open.

    The caller decides what a fault is: only the dependency failing (an error, a timeout) counts;
    a cache miss or a not-found is a success. Usage::

        if breaker.allow():
            try:
                value = await call()
            except DependencyError:
                breaker.failure()
            else:
                breaker.success()
    """

    def __init__(
        self,
        name: str,
        *,
        failures: int,
        reset_seconds: float,
        on_change: StateListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or reset_seconds <= 0:
            raise ValueError("a breaker needs failures >= 1 and reset_seconds > 0")
        self.name = name
        self.failures = failures
        self.reset_seconds = reset_seconds
        self._on_change = on_change
        self._clock = clock
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None

    @classmethod
    def from_settings(
        cls,
        name: str,
        settings: Settings,
        *,
        on_change: StateListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> CircuitBreaker:
        """A breaker with the thresholds of `breaker_failures` and `breaker_reset_seconds`."""
        return cls(
            name,
            failures=settings.breaker_failures,
            reset_seconds=settings.breaker_reset_seconds,
            on_change=on_change,
            clock=clock,
        )

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose wait is over reads as half-open."""
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_seconds:
            self._set("half_open")
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to the dependency now. In half-open, only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self._clock()
        # A probe whose caller was cancelled never reports back; after a reset period it counts as lost.
        if self._probe_started is not None and now - self._probe_started < self.reset_seconds:
            return False
        self._probe_started = now
        return True

    def success(self) -> bool:
        """Record a call the dependency answered (a miss or not-found included). True when this closed the
        breaker: the dependency is back, and what the caller kept from the faulty time (pooled connections) is
        best dropped."""
        self._consecutive = 0
        self._probe_started = None
        if self._state != "closed":
            self._set("closed")
            return True
        return False

    def failure(self) -> None:
        """Record a dependency fault: an error or a timeout."""
        self._consecutive += 1
        self._probe_started = None
        if self._state == "half_open" or (self._state == "closed" and self._consecutive >= self.failures):
            self._opened_at = self._clock()
            self._set("open")

    def _set(self, state: BreakerState) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(self.name, state)
