"""The service with its cache tiers and deadlines: fresh reads after writes, Redis faults that stay invisible,
deadlines that return partial answers, and the embedded fallback when the database is gone."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import pytest

from sage_server import context, search, spelling
from sage_server import service as service_module
from sage_server.config import Settings
from sage_server.errors import Timeout, Unavailable
from sage_server.models import DocumentIn
from sage_server.resources import knowledge_dir
from sage_server.service import KnowledgeService, open_service
from tests.conftest import make_settings, sqlite_db
from tests.redis_support import RedisServer

pytestmark = pytest.mark.anyio


def doc(body: str, doc_id: str = "note") -> DocumentIn:
    return DocumentIn(id=doc_id, title="Note", layer="practices", body=body)


def hits(kb: KnowledgeService, tier: str) -> float:
    value = kb.metrics.registry.get_sample_value("sage_cache_hits_total", {"tier": tier})
    return value or 0.0


async def test_warm_reads_hit_memory_and_a_write_is_never_followed_by_a_stale_read(service: KnowledgeService) -> None:
    first = await service.get("honesty")
    assert await service.get("honesty") == first
    assert hits(service, "memory") >= 1
    await service.search("retry")
    await service.search("retry")
    assert hits(service, "memory") >= 2
    await service.save(doc("zebra words"))
    assert (await service.get("note")).body == "zebra words"
    await service.save(doc("quokka words"))
    assert (await service.get("note")).body == "quokka words"
    assert [h.id for h in (await service.search("quokka words")).hits] == ["note"]
    assert "note" not in [h.id for h in (await service.search("zebra")).hits]


async def test_disk_tier_survives_a_restart(settings: Settings) -> None:
    async with open_service(settings) as kb:
        await kb.get("honesty")
    async with open_service(settings) as kb:
        await kb.get("honesty")
        assert hits(kb, "disk") == 1


def two_instances(tmp_path: Path, knowledge: Path, redis_url: str | None) -> tuple[Settings, Settings]:
    shared = {
        "db_path": tmp_path / "shared.db",
        "knowledge_dirs": [knowledge],
        "redis_url": redis_url,
        "cache_namespace": f"sagetest-{uuid.uuid4().hex[:8]}",
    }
    return (
        make_settings(tmp_path / "a", cache_dir=tmp_path / "a-cache", **shared),
        make_settings(tmp_path / "b", cache_dir=tmp_path / "b-cache", **shared),
    )


async def read_until(kb: KnowledgeService, expected: str, within: float) -> None:
    with anyio.fail_after(within):
        while (await kb.get("note")).body != expected:
            await anyio.sleep(0.01)


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis-pubsub", "sqlite-poll"])
async def test_two_instances_see_each_others_writes(
    tmp_path: Path, knowledge: Path, redis_server: RedisServer, with_redis: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if with_redis:  # no poll to fall back on: what arrives came through Redis
        monkeypatch.setattr(service_module, "GENERATION_POLL_SECONDS", 3600.0)
    for path in (tmp_path / "a", tmp_path / "b"):
        path.mkdir()
    a_settings, b_settings = two_instances(tmp_path, knowledge, redis_server.url if with_redis else None)
    async with open_service(a_settings) as a, open_service(b_settings) as b:
        await a.save(doc("version one"))
        assert (await b.get("note")).body == "version one"  # now cached in b's tiers
        await a.save(doc("version two"))
        # Milliseconds through Redis, a second through the poll; the bound only says it arrives.
        await read_until(b, "version two", within=10)


async def test_redis_killed_mid_stream_loses_nothing_and_health_recovers(
    tmp_path: Path, knowledge: Path, redis_server: RedisServer
) -> None:
    settings = make_settings(
        tmp_path, knowledge_dirs=[knowledge], redis_url=redis_server.url, breaker_failures=2, breaker_reset_seconds=0.5
    )
    async with open_service(settings) as kb:
        with anyio.fail_after(10):  # the first ping opens a connection; on a busy machine it may miss its deadline
            while (await kb.health()).status != "healthy":
                await anyio.sleep(0.05)
        for n in range(30):
            if n == 10:
                redis_server.kill()
            await kb.save(doc(f"write {n}", doc_id=f"stream-{n}"))
            assert (await kb.get(f"stream-{n}")).body == f"write {n}"
            assert (await kb.search(f"write {n}")).hits
        health = await kb.health()
        assert health.components["cache"] == "degraded" and health.status == "degraded"
        assert (await kb.info()).documents == 4 + 30
        await redis_server.start()
        with anyio.fail_after(10):
            while (await kb.health()).status != "healthy":
                await anyio.sleep(0.05)


async def test_frozen_redis_still_meets_the_read_deadline(
    tmp_path: Path, knowledge: Path, redis_server: RedisServer
) -> None:
    settings = make_settings(
        tmp_path,
        knowledge_dirs=[knowledge],
        redis_url=redis_server.url,
        cache_memory=False,
        cache_disk=False,
        timeout_cache_ms=100,
        timeout_read_ms=500,
    )
    async with open_service(settings) as kb:
        redis_server.pause()
        try:
            for _ in range(5):
                # A frozen Redis costs each read its cache deadline, then the store answers: never a hang. (The bound
                # here is generous on purpose: how fast belongs to the benchmark, that it returns to this test.)
                with anyio.fail_after(5):
                    assert (await kb.get("honesty")).id == "honesty"
        finally:
            redis_server.resume()
        timeouts = kb.metrics.registry.get_sample_value("sage_cache_errors_total", {"tier": "redis", "kind": "timeout"})
        assert timeouts is not None and timeouts >= 1  # the reads did meet the frozen Redis, and gave up on it


async def test_a_slow_search_returns_what_was_ranked_marked_partial(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stuck_correction(*args: object) -> None:
        await anyio.sleep(30)

    fast = settings.model_copy(update={"timeout_search_ms": 300, "cache_memory": False, "cache_disk": False})
    async with open_service(fast) as kb:
        # A word no document holds makes the search look for misspellings; that step hangs here, after ranking.
        monkeypatch.setattr(spelling, "correct", stuck_correction)
        with anyio.fail_after(10):  # cut short at the search deadline, not after the 30 s step
            result = await kb.search("circuit breakr")
        assert result.partial and "search limit of 300 ms" in (result.partial_reason or "")
        assert result.hits[0].id == "timeout-resilience" and "**" in result.hits[0].snippet


async def test_a_search_that_cannot_rank_in_time_is_a_timeout(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stuck_rank(*args: object, **kwargs: object) -> list[search.Ranked]:
        await anyio.sleep(30)
        return []

    fast = settings.model_copy(update={"timeout_search_ms": 200})
    async with open_service(fast) as kb:
        monkeypatch.setattr(search, "rank", stuck_rank)
        with pytest.raises(Timeout, match="search limit of 200 ms"):
            await kb.search("anything at all")


async def test_a_slow_context_keeps_the_essentials_marked_partial(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stuck_candidates(*args: object, **kwargs: object) -> list[object]:
        await anyio.sleep(30)
        return []

    fast = settings.model_copy(update={"timeout_context_ms": 300})
    async with open_service(fast) as kb:
        monkeypatch.setattr(context, "candidates", stuck_candidates)
        result = await kb.context("add retries", max_tokens=500)
        assert result.partial and result.sections == [] and "Honesty" in result.essentials


async def test_unusable_database_falls_back_to_the_bundled_core(tmp_path: Path) -> None:
    (tmp_path / "broken.db").write_bytes(b"not a database at all" * 50)
    settings = make_settings(tmp_path, db_path=tmp_path / "broken.db", bundled_knowledge=True)
    async with open_service(settings, fallback=True) as kb:
        health = await kb.health()
        assert health.status == "degraded" and health.components["knowledge"] == "degraded"
        core = await kb.list(layer="core")
        assert core.total == len(list((knowledge_dir() / "core").glob("*.md")))
        assert (await kb.list(layer="practices")).total == 0
        with pytest.raises(Unavailable, match="read-only"):
            await kb.save(doc("nope"))
    assert (tmp_path / "broken.db").read_bytes() == b"not a database at all" * 50


async def test_a_cancelled_read_leaves_no_poisoned_connection(settings: Settings) -> None:
    async with open_service(settings) as kb:
        for _ in range(6):  # more than the pool holds, so every reader is cancelled at least once
            with anyio.move_on_after(0):
                async with sqlite_db(kb).read() as conn:
                    await conn.execute("SELECT count(*) FROM docs_fts WHERE docs_fts MATCH 'retry OR key OR rotate'")
        for _ in range(6):
            assert (await kb.search("rotate a leaked key")).hits
        assert (await kb.health()).status == "healthy"
