"""Load loops bounded in count and time, and the latency summary every measurement reports."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import anyio

# A loop that overruns its time bound by this much more is cancelled: a hung request must not hang the run.
HARD_STOP_GRACE_SECONDS = 30.0
T = TypeVar("T")
Call = Callable[[int, int], Awaitable[object]]  # (worker, request index) -> anything


@dataclass
class Latency:
    """Latencies of one measurement, in milliseconds, and its throughput (successful calls per second)."""

    n: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    rps: float
    seconds: float
    concurrency: int = 1
    first_error: str | None = None
    # Answers cut short by their deadline (`partial`: a context of the essentials alone, say): counted in the
    # latencies, since they were answers, but a loop where many are partial measured the deadline, not the work.
    partial: int = 0


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted samples (no interpolation: p99 of 100 samples is the largest but one)."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(
    samples: Iterable[float],
    seconds: float,
    concurrency: int = 1,
    errors: int = 0,
    first_error: str | None = None,
    partial: int = 0,
) -> Latency:
    """Summarize latencies given in seconds over a run that took `seconds` of wall time."""
    ordered = sorted(samples)
    ms = [s * 1000 for s in ordered]
    return Latency(
        n=len(ms),
        errors=errors,
        p50_ms=round(percentile(ms, 0.50), 3),
        p95_ms=round(percentile(ms, 0.95), 3),
        p99_ms=round(percentile(ms, 0.99), 3),
        mean_ms=round(sum(ms) / len(ms), 3) if ms else math.nan,
        rps=round(len(ms) / seconds, 1) if seconds > 0 else math.nan,
        seconds=round(seconds, 3),
        concurrency=concurrency,
        first_error=first_error,
        partial=partial,
    )


async def run_load(call: Call, *, concurrency: int, count: int, seconds: float) -> Latency:
    """Run `call` up to `count` times from `concurrency` workers, stopping early once `seconds` have passed.

    A failing call is counted (the first error kept for the report) and the loop goes on.
    """
    samples: list[float] = []
    errors = partial = 0
    first_error: str | None = None
    issued = 0
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        nonlocal issued, errors, first_error, partial
        while issued < count and time.monotonic() < deadline:
            request = issued
            issued += 1
            started = time.perf_counter()
            try:
                answer = await call(index, request)
            except Exception as exc:  # a benchmark reports failures instead of stopping at the first
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
            else:
                samples.append(time.perf_counter() - started)
                partial += is_partial(answer)

    started = time.perf_counter()
    with anyio.move_on_after(seconds + HARD_STOP_GRACE_SECONDS) as scope:
        async with anyio.create_task_group() as group:
            for index in range(concurrency):
                group.start_soon(worker, index)
    if scope.cancelled_caught:
        first_error = first_error or f"hard stop after {seconds + HARD_STOP_GRACE_SECONDS:.0f} s"
        errors += 1
    return summarize(samples, time.perf_counter() - started, concurrency, errors, first_error, partial)


def is_partial(answer: object) -> bool:
    """Whether an answer (a model, or its JSON as a dict) says the deadline cut it short."""
    flag = answer.get("partial") if isinstance(answer, dict) else getattr(answer, "partial", False)
    return flag is True


@dataclass(frozen=True)
class Budget:
    """How many requests each loop sends, and for how long at most."""

    serial: int  # requests at concurrency 1
    concurrent: int  # requests at concurrency 32
    seconds: float  # time bound of one loop
    warmup: int  # unmeasured requests before the first loop of each interface
    cache_ids: int  # documents read cold, then warm, per cache configuration
    writes: dict[int, int]  # writes per concurrency level
    cold_starts: int  # launches of `sage serve` whose time to /ready is measured (median reported)


FULL = Budget(
    serial=300, concurrent=2000, seconds=10, warmup=30, cache_ids=200, writes={1: 200, 8: 600, 32: 1500}, cold_starts=3
)
QUICK = Budget(serial=8, concurrent=40, seconds=5, warmup=3, cache_ids=8, writes={1: 6, 8: 16, 32: 40}, cold_starts=1)
CONCURRENCY = 32
