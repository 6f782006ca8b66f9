"""A database's identity in every cache key: databases sharing a cache folder or a Redis never answer for each
other, and a restored database is never answered from the entries of the one it replaced."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from sage_server import backup
from sage_server.config import Settings
from sage_server.errors import NotFound
from sage_server.models import DocumentIn
from sage_server.service import open_service
from tests.conftest import make_settings, write_doc
from tests.redis_support import RedisServer

pytestmark = pytest.mark.anyio


def two_databases(tmp_path: Path, redis_url: str) -> tuple[Settings, Settings]:
    """Two knowledge bases with different documents, sharing one cache folder and one Redis (same namespace)."""
    shared = {"cache_dir": tmp_path / "shared-cache", "redis_url": redis_url}
    result = []
    for name, count in (("a", 3), ("b", 1)):
        folder = tmp_path / f"kb-{name}"
        for n in range(count):
            write_doc(folder, f"practices/{name}{n}.md", f"# Page {name}{n}\n\nShared word tortoise in {name}.\n")
        result.append(make_settings(tmp_path, db_path=tmp_path / f"{name}.db", knowledge_dirs=[folder], **shared))
    return result[0], result[1]


@pytest.mark.parametrize("first", ["a", "b"])
async def test_two_databases_sharing_a_cache_see_only_their_own(
    tmp_path: Path, redis_server: RedisServer, first: str
) -> None:
    a, b = two_databases(tmp_path, redis_server.url)
    order = [a, b] if first == "a" else [b, a]
    seen: dict[str, list[tuple[int, str, list[str]]]] = {}
    for settings in [*order, *order]:  # twice each: the second pass reads what the other wrote into the tiers
        async with open_service(settings) as kb:
            info = await kb.info()
            hits = [h.id for h in (await kb.search("tortoise")).hits]
            seen.setdefault(settings.db_path.name, []).append((info.documents, info.db_path, hits))
    assert seen["a.db"] == [(3, str(a.db_path), ["practices.a0", "practices.a1", "practices.a2"])] * 2
    assert seen["b.db"] == [(1, str(b.db_path), ["practices.b0"])] * 2
    async with open_service(b) as kb:
        with pytest.raises(NotFound):
            await kb.get("practices.a0")


async def test_writes_of_another_database_on_the_same_redis_do_not_hide_ours(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = two_databases(tmp_path, redis_server.url)
    async with open_service(a) as kb_a, open_service(b) as kb_b:
        assert (await kb_b.get("practices.b0")).revision == 1
        for n in range(5):  # a's generation runs ahead of b's
            await kb_a.save(DocumentIn(id=f"note-{n}", title="Note", layer="practices", body="text"))
        await anyio.sleep(0.2)  # time for a's announcements to reach b, if they did
        doc = await kb_b.get("practices.b0")
        await kb_b.save(DocumentIn(id="practices.b0", title="Page b0", layer="practices", body="Rewritten."))
        assert (await kb_b.get("practices.b0")).body == "Rewritten."
        assert doc.revision == 1


async def test_backup_delete_restore_then_the_document_is_found_again(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], backup_dir=tmp_path / "bk")
    async with open_service(settings) as kb:
        report = backup.backup(settings.db_path, settings.backup_dir, retention_days=90)
        await kb.save(DocumentIn(id="before", title="Zebra notes", layer="practices", body="zebra crossing"))
        await kb.delete("honesty")
        assert [h.id for h in (await kb.search("zebra")).hits] == ["before"]  # cached at this generation
        with pytest.raises(NotFound):
            await kb.get("honesty")
    backup.restore(Path(report.path), settings.db_path)
    async with open_service(settings.model_copy(update={"import_on_start": False})) as kb:
        assert (await kb.get("honesty")).revision == 1
        # The restored database counts generations from the backup's: this write reaches the number the cache
        # entries above were made under. Only the new identity keeps them from answering.
        await kb.save(DocumentIn(id="after", title="Zebra facts", layer="practices", body="zebra stripes"))
        await kb.save(DocumentIn(id="other", title="Other", layer="practices", body="nothing striped"))
        assert [h.id for h in (await kb.search("zebra")).hits] == ["after"]
