"""Circuit breaker: opens after consecutive faults, probes once after the wait, closes on a good probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_server.breaker import BreakerState, CircuitBreaker
from tests.conftest import make_settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_breaker(clock: FakeClock, changes: list[tuple[str, BreakerState]] | None = None) -> CircuitBreaker:
    def record(name: str, state: BreakerState) -> None:
        if changes is not None:
            changes.append((name, state))

    return CircuitBreaker("redis", failures=3, reset_seconds=10, on_change=record, clock=clock)


def test_opens_after_consecutive_failures_only() -> None:
    breaker = make_breaker(FakeClock())
    for _ in range(5):
        breaker.failure()
        breaker.failure()
        assert not breaker.success()  # a miss or not-found is a success: the count starts again
    assert (breaker.state, breaker.allow()) == ("closed", True)
    for _ in range(3):
        breaker.failure()
    assert (breaker.state, breaker.allow()) == ("open", False)


def test_half_open_allows_one_probe_and_closes_on_success() -> None:
    clock = FakeClock()
    changes: list[tuple[str, BreakerState]] = []
    breaker = make_breaker(clock, changes)
    for _ in range(3):
        breaker.failure()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.state == "half_open"
    assert breaker.allow()
    assert not breaker.allow(), "a second call while the probe is out must wait"
    assert breaker.success(), "success() says when it closed the breaker (the cache then resets its pool)"
    assert (breaker.state, breaker.allow()) == ("closed", True)
    assert changes == [("redis", "open"), ("redis", "half_open"), ("redis", "closed")]


def test_failed_probe_opens_again_for_a_full_wait() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(3):
        breaker.failure()
    clock.now += 10
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open"
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_a_lost_probe_is_replaced_after_a_wait() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(3):
        breaker.failure()
    clock.now += 10
    assert breaker.allow()  # this probe's caller is cancelled and never reports
    clock.now += 5
    assert not breaker.allow()
    clock.now += 5
    assert breaker.allow()


def test_each_dependency_has_its_own_breaker(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, breaker_failures=2, breaker_reset_seconds=0.5)
    redis = CircuitBreaker.from_settings("redis", settings)
    disk = CircuitBreaker.from_settings("disk", settings)
    assert (redis.failures, redis.reset_seconds) == (2, 0.5)
    redis.failure()
    redis.failure()
    assert redis.state == "open" and disk.state == "closed"


def test_rejects_meaningless_thresholds() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failures=0, reset_seconds=1)
    with pytest.raises(ValueError):
        CircuitBreaker("x", failures=1, reset_seconds=0)
