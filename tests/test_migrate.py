"""Forward-only migrations: to head, idempotent, checksummed, and upgrades that keep data."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from sage_server.errors import MigrationError
from sage_server.resources import migrations_dir
from sage_server.store.migrations import migrate, migration_files, statements
from sage_server.store.sqlite_documents import IMPORT_CANDIDATES

pytestmark = pytest.mark.anyio


async def _tables(conn: aiosqlite.Connection) -> set[str]:
    async with conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')") as cursor:
        return {row[0] for row in await cursor.fetchall()}


async def test_empty_database_to_head_then_no_op(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "db.sqlite", isolation_level=None) as conn:
        applied = await migrate(conn, migrations_dir())
        assert applied == [f.name for f in migration_files(migrations_dir())]
        assert {"documents", "revisions", "sections", "docs_fts", "schema_migrations"} <= await _tables(conn)
        assert await migrate(conn, migrations_dir()) == []
        async with conn.execute("SELECT name, length(sha256) FROM schema_migrations") as cursor:
            assert all(length == 64 for _, length in await cursor.fetchall())


async def test_changed_applied_migration_is_an_error_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), folder)
    async with aiosqlite.connect(tmp_path / "db.sqlite", isolation_level=None) as conn:
        await migrate(conn, folder)
        first = migration_files(folder)[0]
        first.write_text(first.read_text() + "\n-- edited\n")
        with pytest.raises(MigrationError, match=rf"{first.name}: migration changed after it was applied"):
            await migrate(conn, folder)


async def test_database_from_earlier_migration_upgrades_with_data_intact(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), folder)
    async with aiosqlite.connect(tmp_path / "db.sqlite", isolation_level=None) as conn:
        await migrate(conn, folder)
        await conn.execute(
            "INSERT INTO documents (id, title, layer, body, content_hash, tokens, revision, change, created_at, "
            "updated_at) VALUES ('kept', 'Kept', 'core', 'old body', 'h', 2, 1, 'create', 'now', 'now')"
        )
        (folder / "9000_add_owner.sql").write_text(
            "ALTER TABLE documents ADD COLUMN owner TEXT NOT NULL DEFAULT 'team';\n"
            "CREATE TABLE owners (name TEXT PRIMARY KEY);\n"
        )
        assert await migrate(conn, folder) == ["9000_add_owner.sql"]
        async with conn.execute("SELECT id, body, owner FROM documents") as cursor:
            assert list(map(tuple, await cursor.fetchall())) == [("kept", "old body", "team")]


async def test_failing_migration_rolls_back_whole(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), folder)
    (folder / "9001_broken.sql").write_text("CREATE TABLE half (x);\nINSERT INTO nowhere VALUES (1);\n")
    async with aiosqlite.connect(tmp_path / "db.sqlite", isolation_level=None) as conn:
        with pytest.raises(MigrationError, match="9001_broken.sql: no such table: nowhere"):
            await migrate(conn, folder)
        assert "half" not in await _tables(conn)
        async with conn.execute("SELECT count(*) FROM schema_migrations WHERE name = '9001_broken.sql'") as cursor:
            assert (await cursor.fetchone()) == (0,)


async def test_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "db.sqlite", isolation_level=None) as conn:
        await migrate(conn, migrations_dir())
        await conn.execute("INSERT INTO schema_migrations VALUES ('9999_future.sql', 'x', 'now')")
        with pytest.raises(MigrationError, match="newer SAGE"):
            await migrate(conn, migrations_dir())


def test_statement_splitter_keeps_trigger_bodies_whole() -> None:
    sql = "CREATE TABLE t (x);\nCREATE TRIGGER tr AFTER INSERT ON t BEGIN\n  SELECT 1;\n  SELECT 2;\nEND;\n-- done\n"
    parts = statements(sql)
    assert len(parts) == 2 and parts[1].startswith("CREATE TRIGGER") and parts[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        statements("CREATE TABLE t (x)")
    assert all(sqlite3.complete_statement(p) for p in parts)


async def test_an_imports_survey_reads_an_index_not_the_documents_bodies(tmp_path: Path) -> None:
    # Every start that re-scans its folders runs this read over every document: on the table it would page through
    # all the bodies (840 MB at 100k documents), on the covering index only the bookkeeping.
    async with aiosqlite.connect(tmp_path / "db.sqlite", isolation_level=None) as conn:
        await migrate(conn, migrations_dir())
        async with conn.execute(f"EXPLAIN QUERY PLAN {IMPORT_CANDIDATES}", ("[]",)) as cursor:
            plan = " | ".join(row[3] for row in await cursor.fetchall())
    assert "SCAN documents USING COVERING INDEX documents_import" in plan, plan
