"""The service's write path: revisions, conflicts, soft delete, restore, purge, and an index that follows."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest

from sage_server import importing
from sage_server.config import Settings
from sage_server.errors import Conflict, InvalidInput, NotFound
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from sage_server.store import reader_count
from sage_server.store.sqlite import default_readers
from sage_server.store.sqlite_connections import cache_kib
from tests.conftest import BACKENDS, assert_index_consistent, database_for, make_settings

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BACKENDS)
async def settings(request: pytest.FixtureRequest, tmp_path: Path, knowledge: Path) -> AsyncIterator[Settings]:
    """Every test here runs on SQLite and on PostgreSQL."""
    async with database_for(request.param) as database:
        yield make_settings(tmp_path, knowledge_dirs=[knowledge], **database)


def doc(body: str = "Use a bounded queue for backpressure.", **fields: object) -> DocumentIn:
    values: dict[str, object] = {"id": "queues", "title": "Bounded Queues", "layer": "practices", "body": body}
    values.update(fields)
    return DocumentIn.model_validate(values)


async def ids(kb: KnowledgeService, query: str) -> list[str]:
    return [hit.id for hit in (await kb.search(query)).hits]


async def test_save_creates_then_updates_keeping_every_revision(service: KnowledgeService) -> None:
    first = await service.save(doc())
    assert (first.revision, first.deleted) == (1, False)
    second = await service.save(doc("Prefer load shedding over unbounded buffering."))
    assert second.revision == 2 and second.created_at == first.created_at
    history = await service.history("queues")
    assert [(r.revision, r.change) for r in history.revisions] == [(2, "update"), (1, "create")]
    assert await ids(service, "shedding") == ["queues"]
    assert await ids(service, "backpressure") == []
    await assert_index_consistent(service)


async def test_identical_save_stores_nothing(service: KnowledgeService) -> None:
    await service.save(doc())
    generation = (await service.info()).generation
    again = await service.save(doc())
    assert again.revision == 1 and (await service.info()).generation == generation
    # What each save did, as REST's status codes tell it.
    assert (await service.save_outcome(doc())).outcome == "unchanged"
    changed = await service.save_outcome(doc(body="Something else entirely."))
    assert (changed.outcome, changed.document.revision) == ("updated", 2)
    assert (await service.save_outcome(doc(id="another-one"))).outcome == "created"


async def test_expected_revision_turns_a_race_into_a_conflict(service: KnowledgeService) -> None:
    await service.save(doc(), expected_revision=0)
    with pytest.raises(Conflict, match="already|revision 1"):
        await service.save(doc("other"), expected_revision=0)
    await service.save(doc("mine"), expected_revision=1)
    with pytest.raises(Conflict) as caught:
        await service.save(doc("stale"), expected_revision=1)
    assert caught.value.details["current_revision"] == 2
    assert (await service.get("queues")).body.startswith("mine")


async def test_concurrent_writers_are_serialized_without_loss(service: KnowledgeService) -> None:
    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(service.save, doc(f"version {n}", id=f"doc-{n}"))
    listing = await service.list(layer="practices", limit=100)
    assert {f"doc-{n}" for n in range(20)} <= {item.id for item in listing.items}
    await assert_index_consistent(service)


async def test_delete_is_soft_and_restore_brings_it_back(service: KnowledgeService) -> None:
    await service.save(doc())
    deleted = await service.delete("queues")
    assert deleted.deleted and deleted.revision == 2
    with pytest.raises(NotFound, match="was deleted at revision 2"):
        await service.get("queues")
    assert await ids(service, "backpressure") == []
    assert "queues" not in {item.id for item in (await service.list(limit=100)).items}
    restored = await service.restore("queues", 1)
    assert restored.revision == 3 and not restored.deleted and restored.body.startswith("Use a bounded")
    assert await ids(service, "backpressure") == ["queues"]
    changes = [r.change for r in (await service.history("queues")).revisions]
    assert changes == ["restore", "delete", "create"]
    await assert_index_consistent(service)


async def test_restore_unknown_revision_and_purge_rules(service: KnowledgeService) -> None:
    await service.save(doc())
    with pytest.raises(NotFound, match="no revision 7"):
        await service.restore("queues", 7)
    with pytest.raises(Conflict, match="delete it before purging"):
        await service.purge("queues")
    await service.delete("queues")
    await service.purge("queues")
    with pytest.raises(NotFound):
        await service.history("queues")
    await assert_index_consistent(service)


async def test_unknown_id_suggests_close_ids(service: KnowledgeService) -> None:
    with pytest.raises(NotFound) as caught:
        await service.get("timeout-resilence")
    assert "timeout-resilience" in caught.value.details["suggestions"]
    assert "did you mean timeout-resilience" in caught.value.message


async def test_invalid_input_is_named(service: KnowledgeService) -> None:
    with pytest.raises(InvalidInput, match="unknown layer 'recipes'"):
        await service.save(doc(layer="recipes"))
    with pytest.raises(ValueError, match="invalid id"):
        doc(id="../etc/passwd")
    with pytest.raises(InvalidInput, match="limit must be between 1 and 100"):
        await service.list(limit=0)


async def test_info_and_health(service: KnowledgeService) -> None:
    info = await service.info()
    assert info.documents == 4 and info.layers["core"] == 1 and info.layers["templates"] == 0
    assert info.tokens > 0 and info.version
    health = await service.health()
    assert health.status == "healthy"
    assert set(health.components) == {"core", "cache", "knowledge", "backup"}


async def test_list_pages_with_cursor(service: KnowledgeService) -> None:
    for n in range(7):
        await service.save(doc(id=f"page-{n}"))
    seen: list[str] = []
    cursor = None
    while True:
        page = await service.list(layer="practices", limit=3, cursor=cursor)
        seen += [item.id for item in page.items]
        assert page.total == 8
        cursor = page.next_cursor
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 8
    with pytest.raises(InvalidInput, match="different query"):
        await service.list(layer="core", cursor=page.next_cursor or (await service.list(limit=1)).next_cursor)


async def test_health_and_gets_find_a_reader_while_every_ranking_slot_holds_one(service: KnowledgeService) -> None:
    """Searches and context packing hold their reader while they rank; they may take all readers but one, so the
    point reads behind them never queue (a /health that timed out waiting said the knowledge was unhealthy)."""
    slots = service.ranking.value
    async with AsyncExitStack() as rankings:
        for _ in range(slots):
            await rankings.enter_async_context(service.ranking)
            await rankings.enter_async_context(service.store.read())  # what a ranking holds meanwhile
        with anyio.fail_after(30):  # a hang guard, not a speed limit: without a free reader this never returns
            assert (await service.health()).components["knowledge"] == "healthy"
            assert (await service.get("handling-secrets")).id == "handling-secrets"
        assert service.ranking.value == 0  # a search now would wait for a slot, not for a reader


async def test_a_context_queued_behind_every_ranking_still_gets_its_essentials_by_its_deadline(
    settings: Settings,
) -> None:
    """The essentials are a point read: they take no ranking slot, so a context whose ranking waits past its deadline
    still answers with them, marked partial (had they queued for a slot too, it would wait with no deadline)."""
    async with open_service(settings.model_copy(update={"timeout_context_ms": 300})) as kb:
        async with AsyncExitStack() as rankings:
            for _ in range(kb.ranking.value):
                await rankings.enter_async_context(kb.ranking)
            with anyio.fail_after(30):  # a hang guard, not a speed limit
                result = await kb.context("handle secrets in configuration")
        assert result.partial and result.essentials
        assert result.sections == []


def test_readers_are_sized_from_the_cores_and_share_the_page_cache_with_the_writer() -> None:
    assert [default_readers(cores) for cores in (1, 2, 4, 64)] == [3, 4, 8, 16]
    assert cache_kib(64 * 2**20, 4) == (32_768, 8_192)  # half the writer's, half shared by four readers
    assert cache_kib(8 * 2**20, 16) == (4_096, 2_048)  # never below 2 MiB a connection
    assert reader_count(make_settings(Path("/tmp/unused"), sqlite_readers=5)) == 5


async def test_a_start_that_fails_in_its_import_closes_what_it_opened(
    tmp_path: Path, knowledge: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object) -> None:
        raise OSError("the disk went away")

    monkeypatch.setattr(importing, "run", broken)
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge])
    before = {thread.ident for thread in threading.enumerate()}
    with pytest.raises(OSError, match="disk went away"):
        async with open_service(settings):
            pass
    # Every connection's thread is gone (they kept the test run from exiting), and the database opens again.
    # (AnyIO keeps its idle worker threads for later calls.)
    started = [t for t in threading.enumerate() if t.ident not in before and not t.name.startswith("AnyIO worker")]
    assert started == []
    monkeypatch.undo()
    async with open_service(settings) as kb:
        assert (await kb.info()).documents == 4
