"""Disaster recovery: online backups that verify after every kind of change, checksums, retention, `sage verify
--all`, restore (refused while served, a new identity after), and the backup job's state in /health."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosqlite
import pytest

from sage_server import backup
from sage_server.config import Settings
from sage_server.errors import Conflict, InvalidInput, Unavailable
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from sage_server.store.migrations import migrate
from tests.conftest import make_settings, sage_env, sage_runner, sqlite_db, write_doc

pytestmark = pytest.mark.anyio


def _doc(body: str, doc_id: str = "kept") -> DocumentIn:
    return DocumentIn(id=doc_id, title="Kept", layer="core", body=body)


async def _delete(kb: KnowledgeService, knowledge: Path) -> None:
    await kb.delete("honesty")


async def _update(kb: KnowledgeService, knowledge: Path) -> None:
    await kb.save(_doc("first"))
    await kb.save(_doc("second"))


async def _restore_revision(kb: KnowledgeService, knowledge: Path) -> None:
    await _update(kb, knowledge)
    await kb.restore("kept", 1)


async def _purge(kb: KnowledgeService, knowledge: Path) -> None:
    await kb.delete("honesty")
    await kb.purge("honesty")


async def _import_removing_a_file(kb: KnowledgeService, knowledge: Path) -> None:
    (knowledge / "frameworks" / "timeouts.md").unlink()
    assert (await kb.import_paths([knowledge])).removed == 1


CHANGES: dict[str, Callable[[KnowledgeService, Path], Awaitable[None]]] = {
    "delete": _delete,
    "update": _update,
    "restore a revision": _restore_revision,
    "purge": _purge,
    "import removing a file": _import_removing_a_file,
}


@pytest.mark.parametrize("change", CHANGES)
async def test_verify_backup_and_restore_after_every_kind_of_change(
    change: str, settings: Settings, knowledge: Path, tmp_path: Path
) -> None:
    async with open_service(settings) as kb:
        await CHANGES[change](kb, knowledge)
        expected = sorted(item.id for item in (await kb.list(limit=100)).items)
        assert backup.verify(settings.db_path, thorough=True).ok
        report = backup.backup(settings.db_path, tmp_path / "backups", retention_days=90)
        await kb.save(_doc("after the backup", "later"))
    assert backup.verify(Path(report.path), thorough=True).ok
    assert backup.restore(Path(report.path), settings.db_path)
    assert backup.verify(settings.db_path, thorough=True).ok
    async with open_service(settings.model_copy(update={"import_on_start": False})) as kb:
        assert sorted(item.id for item in (await kb.list(limit=100)).items) == expected


async def test_verify_still_finds_a_damaged_index(settings: Settings) -> None:
    async with open_service(settings):
        pass
    # An index entry lost behind SAGE's back: the index no longer holds every live document.
    with sqlite3.connect(settings.db_path) as conn:
        conn.execute(
            "INSERT INTO docs_fts (docs_fts, rowid, title, tags, triggers, summary, headings, body, cjk) "
            "SELECT 'delete', key, title, tags, triggers, summary, headings, body, cjk FROM indexed_documents LIMIT 1"
        )
    failed = {c.name for c in backup.verify(settings.db_path).checks if not c.ok}
    assert failed == {"index docs_fts"}


async def test_verify_finds_corrupt_index_bytes_and_a_tampered_document(settings: Settings) -> None:
    async with open_service(settings):
        pass
    with sqlite3.connect(settings.db_path) as conn:
        conn.execute("UPDATE docs_fts_data SET block = zeroblob(length(block)) WHERE id > 10")
    assert {c.name for c in backup.verify(settings.db_path).checks if not c.ok} == {"index docs_fts"}

    async with open_service(settings.model_copy(update={"db_path": settings.db_path.with_name("b.db")})):
        pass
    with sqlite3.connect(settings.db_path.with_name("b.db")) as conn:
        conn.execute("DROP TRIGGER documents_au")  # change a body behind SAGE's back, leaving the index stale
        conn.execute("UPDATE documents SET body = 'tampered' WHERE id = 'honesty'")
    failed = {c.name for c in backup.verify(settings.db_path.with_name("b.db"), thorough=True).checks if not c.ok}
    assert failed == {"index docs_fts", "content hashes"}


async def test_restore_checks_the_checksum(settings: Settings, tmp_path: Path) -> None:
    async with open_service(settings):
        report = backup.backup(settings.db_path, tmp_path / "backups", retention_days=90)
    copy = Path(report.path)
    with sqlite3.connect(copy) as conn:  # still a sound database, but not the one the checksum was written for
        conn.execute("UPDATE meta SET value = 'changed' WHERE key = 'created_at'")
    with pytest.raises(InvalidInput, match="sha256 .* but .*sha256 says"):
        backup.restore(copy, settings.db_path)
    backup.checksum_path(copy).unlink()
    with pytest.raises(InvalidInput, match="no readable checksum beside it"):
        backup.restore(copy, settings.db_path)
    assert backup.restore(copy, settings.db_path, checksum=False)


async def test_restore_is_refused_while_the_database_is_open(settings: Settings, tmp_path: Path) -> None:
    async with open_service(settings) as kb:
        report = backup.backup(settings.db_path, tmp_path / "backups", retention_days=90)
        with pytest.raises(Conflict, match="in use by a running SAGE server.*stop it first"):
            backup.restore(Path(report.path), settings.db_path)
        assert (await kb.get("honesty")).revision == 1
    assert list(tmp_path.glob("*.pre-restore-*")) == []


async def test_restore_keeps_a_safety_copy_and_gives_a_new_identity(settings: Settings, tmp_path: Path) -> None:
    async with open_service(settings) as kb:
        report = backup.backup(settings.db_path, tmp_path / "backups", retention_days=90)
        await kb.save(_doc("only in the replaced database"))
        identity = kb.database_id
    saved = backup.restore(Path(report.path), settings.db_path)
    assert saved is not None
    async with open_service(settings.model_copy(update={"import_on_start": False, "db_path": Path(saved)})) as old:
        assert (await old.get("kept")).body == "only in the replaced database"
    async with open_service(settings.model_copy(update={"import_on_start": False})) as kb:
        assert kb.database_id != identity
        assert (await kb.list(limit=100)).total == 4


def test_restore_refuses_what_is_not_a_backup(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(Unavailable, match="cannot open as a SQLite database"):
        backup.restore(junk, tmp_path / "live.db", checksum=False)
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(InvalidInput, match="not a sound SAGE backup.*not a SAGE database"):
        backup.restore(empty, tmp_path / "live.db", checksum=False)
    assert not (tmp_path / "live.db").exists()


def test_retention_prunes_only_old_backups(tmp_path: Path) -> None:
    folder = tmp_path / "backups"
    folder.mkdir()
    old, recent = folder / "sage-20200101T000000Z.db", folder / "sage-20990101T000000Z.db"
    for path in (old, recent):
        path.write_bytes(b"x")
        backup.checksum_path(path).write_text("x")
    stale = time.time() - 91 * 86400
    os.utime(old, (stale, stale))
    assert backup.prune(folder, retention_days=90) == [str(old)]
    assert sorted(p.name for p in folder.iterdir()) == [recent.name, recent.name + ".sha256"]


# -- /health and the metric ---------------------------------------------------------------------------------------


async def test_backup_health_follows_the_state_in_the_backup_folder(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], backup_dir=tmp_path / "bk")
    async with open_service(settings) as kb:
        assert (await kb.health()).components["backup"] == "healthy"  # a new database has had no time to need one

        backup.record(settings.backup_dir, error="disk full")
        health = await kb.health()
        assert (health.status, health.components["backup"]) == ("degraded", "degraded")

        report = backup.backup(settings.db_path, settings.backup_dir, retention_days=90)
        backup.record(settings.backup_dir, report=report)
        assert (await kb.health()).components["backup"] == "healthy"
        exposition = (await kb.scrape_metrics()).decode()
        stamp = backup.read_state(settings.backup_dir).last_success
        assert stamp is not None
        line = next(x for x in exposition.splitlines() if x.startswith("sage_backup_last_success_timestamp_seconds "))
        assert float(line.split()[1]) == pytest.approx(stamp.timestamp())

        old = backup.BackupState(last_success=datetime.now(UTC) - timedelta(hours=49))
        (settings.backup_dir / backup.STATE_FILE).write_text(old.model_dump_json())
        assert (await kb.health()).components["backup"] == "degraded"  # older than two intervals

    off = settings.model_copy(update={"backup_interval_hours": 0})
    async with open_service(off) as kb:
        health = await kb.health()
        assert (health.status, health.components["backup"]) == ("healthy", "disabled")


async def test_an_old_database_that_never_had_a_backup_is_degraded(settings: Settings) -> None:
    async with open_service(settings) as kb:
        async with sqlite_db(kb).transaction() as conn:
            await conn.execute("UPDATE meta SET value = '2020-01-01T00:00:00+00:00' WHERE key = 'created_at'")
    async with open_service(settings) as kb:
        assert (await kb.health()).components["backup"] == "degraded"


# -- the command line ---------------------------------------------------------------------------------------------


def test_cli_backup_verify_restore(tmp_path: Path, knowledge: Path) -> None:
    env = sage_env(
        tmp_path,
        SAGE_DB_PATH=str(tmp_path / "cli.db"),
        SAGE_BUNDLED_KNOWLEDGE="false",
        SAGE_KNOWLEDGE_DIRS=str(knowledge),
        SAGE_BACKUP_DIR=str(tmp_path / "bk"),
    )

    sage = sage_runner(tmp_path, env)

    assert sage("backup").returncode == 2  # no database yet: a clear error, not an empty backup
    assert sage("info").returncode == 0
    assert sage("delete", "honesty").returncode == 0  # backups stopped after the first delete, once
    assert sage("verify", "--all").returncode == 0
    made = sage("backup", "--json")
    assert made.returncode == 0, made.stderr
    path = json.loads(made.stdout)["path"]
    assert backup.read_state(tmp_path / "bk").last_backup == path
    assert sage("restore", "honesty", "1").returncode == 0
    restored = sage("restore", "--backup", path)
    assert restored.returncode == 0 and "previous database is at" in restored.stdout, restored.stderr
    assert sage("get", "honesty").returncode == 1  # deleted in the backup
    assert sage("verify", "--all").returncode == 0
    missing = sage("restore", "--backup", str(tmp_path / "missing.db"))
    assert missing.returncode == 2 and "no such database file" in missing.stderr
    assert sage("restore").returncode == 2


async def test_a_moved_user_file_and_a_folder_of_real_shapes_back_up(tmp_path: Path) -> None:
    folder = tmp_path / "kb"
    for name in ("core/INDEX.md", "guidelines/INDEX.md", "practices/clang++.md", "practices/clang.md"):
        write_doc(folder, name, f"# {name}\n\ntext\n")
    settings = make_settings(tmp_path, knowledge_dirs=[folder], backup_dir=tmp_path / "bk")
    async with open_service(settings) as kb:
        (folder / "guidelines" / "INDEX.md").unlink()
        await kb.import_paths([folder])
        await kb.delete("core.INDEX")
        report = backup.backup(settings.db_path, settings.backup_dir, retention_days=90)
    assert report.documents == 2
    assert backup.verify(Path(report.path), thorough=True).ok


async def test_a_backup_from_before_the_live_index_restores(settings: Settings, tmp_path: Path) -> None:
    # A database of the previous schema (0001 only) with a soft-deleted document: its index check could not pass then.
    only_first = tmp_path / "migrations-0001"
    only_first.mkdir()
    shipped = Path(__file__).parent.parent / "migrations" / "0001_initial.sql"
    (only_first / shipped.name).write_bytes(shipped.read_bytes())
    legacy = tmp_path / "legacy.db"
    async with aiosqlite.connect(legacy, isolation_level=None) as conn:
        await migrate(conn, only_first)
        await conn.execute(
            "INSERT INTO documents (id, title, layer, body, content_hash, tokens, revision, change, created_at, "
            "updated_at, deleted_at) VALUES ('gone', 'Gone', 'core', 'text', 'x', 1, 2, 'delete', ?, ?, ?)",
            [datetime.now(UTC).isoformat()] * 3,
        )
    report = backup.verify(legacy)
    assert report.ok, report.checks
    assert "structure ok" in next(c.detail for c in report.checks if c.name == "index docs_fts")

    backup.restore(legacy, settings.db_path, checksum=False)
    async with open_service(settings.model_copy(update={"import_on_start": False})):
        pass  # migrates to the live index
    assert backup.verify(settings.db_path, thorough=False).ok
