"""The change feed: every write says which documents it changed, on this instance and on every other one sharing the
database (through Redis, or the database poll without it), and the log that carries it stays bounded."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from sage_server import store
from sage_server.changes import Change
from sage_server.config import Settings
from sage_server.errors import Unavailable
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from tests.conftest import make_settings, sqlite_db, write_doc

pytestmark = pytest.mark.anyio


class Heard:
    """A listener that keeps every Change it is told, and lets a test wait for one."""

    def __init__(self, kb: KnowledgeService) -> None:
        self.changes: list[Change] = []
        self._arrived = anyio.Event()
        self.stop = kb.changes.subscribe(self)

    async def __call__(self, change: Change) -> None:
        self.changes.append(change)
        self._arrived.set()

    async def next(self, seconds: float = 10) -> Change:
        """The next change told (bounded: a change that never comes fails the test)."""
        with anyio.fail_after(seconds):
            while not self.changes:
                await self._arrived.wait()
                self._arrived = anyio.Event()
        return self.changes.pop(0)


@pytest.fixture
async def kb(settings: Settings) -> AsyncIterator[KnowledgeService]:
    async with open_service(settings) as service:
        yield service


def doc(doc_id: str, title: str = "Note", layer: str = "practices", body: str = "Some text.\n") -> DocumentIn:
    return DocumentIn(id=doc_id, title=title, layer=layer, body=body, summary="One line.")


async def test_each_write_says_which_documents_it_changed_and_whether_listings_did(kb: KnowledgeService) -> None:
    heard = Heard(kb)
    await kb.save(doc("note"))
    created = await heard.next()
    assert created.documents == {("note", "practices")} and created.listing and not created.everything
    assert created.generation == kb.generation

    await kb.save(doc("note", body="Other text.\n"))
    edited = await heard.next()
    assert edited.documents == {("note", "practices")} and not edited.listing  # the listing shows no body

    await kb.save(doc("note", title="Renamed", body="Other text.\n"))
    assert (await heard.next()).listing

    await kb.save(doc("note", title="Renamed", layer="frameworks", body="Other text.\n"))
    moved = await heard.next()
    assert moved.documents == {("note", "frameworks"), ("note", "practices")} and moved.listing
    assert moved.layers == {"frameworks", "practices"}

    await kb.delete("note")
    assert (await heard.next()).documents == {("note", "frameworks")}
    await kb.restore("note", 1)
    restored = await heard.next()
    assert restored.documents == {("note", "practices"), ("note", "frameworks")} and restored.listing
    heard.stop()


async def test_a_reimport_names_the_files_it_changed(kb: KnowledgeService, knowledge: Path) -> None:
    heard = Heard(kb)
    write_doc(knowledge, "practices/secrets.md", "# Handling Secrets\n\nRotate keys every quarter.\n")
    write_doc(knowledge, "practices/new.md", "# A New Practice\n\nWrite it down.\n")
    (knowledge / "scenarios" / "plain-note.md").unlink()
    await kb.import_paths([knowledge])
    change = await heard.next()
    assert {doc_id for doc_id, _ in change.documents} == {"handling-secrets", "practices.new", "scenarios.plain-note"}
    assert change.listing and not change.everything


async def test_an_import_of_many_files_is_one_change_to_everything(kb: KnowledgeService, tmp_path: Path) -> None:
    heard = Heard(kb)
    for n in range(store.CHANGE_IDS + 1):
        write_doc(tmp_path / "many", f"practices/n{n}.md", f"# Note {n}\n\nText {n}.\n")
    await kb.import_paths([tmp_path / "many"])
    change = await heard.next()
    assert change.everything and change.listing
    async with sqlite_db(kb).read() as conn:
        rows = await conn.execute_fetchall("SELECT doc_id FROM changes WHERE generation = ?", (kb.generation,))
    assert [row[0] for row in rows] == [store.EVERYTHING]  # one row, not one per file


async def test_the_log_keeps_only_the_newest_generations_and_a_reader_too_far_behind_hears_everything(
    kb: KnowledgeService,
) -> None:
    first = kb.generation
    for n in range(store.CHANGE_RETENTION + 5):
        async with kb.store.transaction() as writer:
            await writer.bump_generation([f"ghost-{n}"])  # ids of no document: rows are still bounded
    await kb.save(doc("last"))
    async with sqlite_db(kb).read() as conn:
        generations = [row[0] for row in await conn.execute_fetchall("SELECT generation FROM changes")]
        assert len(generations) <= store.CHANGE_RETENTION + store.PRUNE_EVERY
        assert min(generations) > kb.generation - store.CHANGE_RETENTION - store.PRUNE_EVERY
    async with kb.store.read() as reader:
        behind = await reader.changes_after(first, 100)
        recent = await reader.changes_after(kb.generation - 1, 100)
    assert Change.from_log(behind).everything
    assert Change.from_log(recent).documents == {("last", "practices")}


async def test_nothing_is_read_while_nobody_listens(kb: KnowledgeService, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = 0

    async def counting(after: int, limit: int) -> store.ChangeLog:
        nonlocal reads
        reads += 1
        raise AssertionError("read without a listener")

    monkeypatch.setattr(kb.changes, "_read", counting)
    await kb.save(doc("quiet"))
    with anyio.fail_after(5):
        while kb.changes.told < kb.generation:
            await anyio.sleep(0.01)
    assert reads == 0


async def test_an_unreadable_log_is_told_as_everything(kb: KnowledgeService, monkeypatch: pytest.MonkeyPatch) -> None:
    heard = Heard(kb)

    async def broken(after: int, limit: int) -> store.ChangeLog:
        raise Unavailable("database error: disk I/O error")

    monkeypatch.setattr(kb.changes, "_read", broken)
    await kb.save(doc("x"))
    change = await heard.next()
    assert change.everything and change.generation == kb.generation


# -- other instances ---------------------------------------------------------------------------------------


Pair = tuple[KnowledgeService, KnowledgeService]


@asynccontextmanager
async def two_instances(settings: Settings, **overrides: object) -> AsyncIterator[Pair]:
    """Two services over one database file, as two `sage serve` processes sharing it would be."""
    other = settings.model_copy(update={"import_on_start": False, **overrides})
    async with open_service(settings.model_copy(update=overrides)) as first, open_service(other) as second:
        yield first, second


async def test_a_write_on_another_instance_is_told_through_the_database_poll(settings: Settings) -> None:
    async with two_instances(settings) as (watching, writing):
        heard = Heard(watching)
        await writing.save(doc("elsewhere", layer="scenarios"))
        change = await heard.next()
        assert change.documents == {("elsewhere", "scenarios")} and change.generation == writing.generation


async def test_a_write_on_another_instance_is_told_through_redis(settings: Settings) -> None:
    redis = {"redis_url": "redis://127.0.0.1:6379/0", "cache_namespace": f"test-{uuid.uuid4().hex}"}
    async with two_instances(settings, **redis) as (watching, writing):
        assert watching._watcher is not None
        with anyio.fail_after(10):  # the subscriber connects in the background
            while not (watching._watcher.connected and writing._watcher and writing._watcher.connected):
                await anyio.sleep(0.01)
        heard = Heard(watching)
        await writing.delete("handling-secrets")
        change = await heard.next()
        assert change.documents == {("handling-secrets", "practices")} and change.listing


async def test_a_change_is_told_once_per_listener_however_the_generation_arrives(tmp_path: Path) -> None:
    # The poll and the instance's own commit both report the generation: listeners hear each write once.
    settings = make_settings(tmp_path)
    async with two_instances(settings) as (first, second):
        heard = Heard(first)
        await first.save(doc("a"))
        await second.save(doc("b"))
        await first.save(doc("c"))
        told: set[str] = set()
        while told != {"a", "b", "c"}:
            change = await heard.next()
            assert not change.everything
            ids = {doc_id for doc_id, _ in change.documents}
            assert not ids & told, "a change was told twice"
            told |= ids
