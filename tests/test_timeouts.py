"""Deadlines: a slow call becomes a typed Timeout naming the operation, or a partial answer with a reason."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from sage_server.errors import Timeout
from sage_server.timeouts import LEVELS, Deadlines
from tests.conftest import make_settings

pytestmark = pytest.mark.anyio

FAST = Deadlines(cache=0.05, read=0.1, search=0.2, context=0.3, complex=0.5)


async def _slow(seconds: float, value: str = "done") -> str:
    await anyio.sleep(seconds)
    return value


def test_levels_come_from_settings(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, timeout_cache_ms=80, timeout_search_ms=1500)
    deadlines = Deadlines.from_settings(settings)
    assert deadlines.seconds("cache") == 0.08
    assert deadlines.seconds("read") == 0.5
    assert deadlines.seconds("search") == 1.5
    assert [deadlines.seconds(level) for level in LEVELS] == sorted(deadlines.seconds(level) for level in LEVELS)


async def test_run_returns_a_fast_result() -> None:
    assert await FAST.run("read", "get_doc", _slow(0, "doc")) == "doc"


async def test_run_raises_timeout_naming_the_operation_and_limit() -> None:
    with anyio.fail_after(10), pytest.raises(Timeout) as caught:  # at the 100 ms limit, not after the 30 s call
        await FAST.run("read", "get_doc", _slow(30))
    assert "get_doc" in caught.value.message and "100 ms" in caught.value.message
    assert caught.value.details == {"operation": "get_doc", "level": "read", "limit_ms": 100}
    assert caught.value.status == 504


async def test_a_timeout_error_from_inside_is_not_relabelled() -> None:
    with pytest.raises(TimeoutError), FAST.limit("search", "search"):
        raise TimeoutError("socket timed out")


async def test_the_tighter_enclosing_deadline_names_the_timeout() -> None:
    with pytest.raises(Timeout, match="sage_context"), FAST.limit("cache", "sage_context"):
        await FAST.run("complex", "import", _slow(30))


async def test_partial_keeps_what_was_ready_and_says_why() -> None:
    found: list[int] = []
    with anyio.fail_after(2), FAST.partial("read", "sage_context") as window:
        for index in range(100):
            await anyio.sleep(0.01)
            found.append(index)
    assert window.partial
    assert window.reason is not None and "sage_context" in window.reason and "100 ms" in window.reason
    assert 0 < len(found) < 100


async def test_partial_collects_concurrent_work_that_finished() -> None:
    found: list[str] = []

    async def fetch(name: str, seconds: float) -> None:
        found.append(await _slow(seconds, name))

    with anyio.fail_after(2), FAST.partial("search", "search") as window:
        async with anyio.create_task_group() as group:
            group.start_soon(fetch, "fast", 0)
            group.start_soon(fetch, "slow", 30)
    assert found == ["fast"] and window.partial


async def test_partial_that_finishes_in_time_is_complete() -> None:
    with FAST.partial("read", "sage_get") as window:
        await anyio.sleep(0)
    assert not window.partial and window.reason is None
