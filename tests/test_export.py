"""Moving a knowledge base between SQLite and PostgreSQL with `sage export` / `sage import --from-export`: nothing
lost either way (documents live and deleted, revisions, aliases, keys, audit), checksums and sound exports required,
a non-empty target refused unless replaced (after a safety export), one transaction, and no cache answering from
before."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from sage_server import backup, export_format
from sage_server.app import create_app
from sage_server.errors import Conflict, InvalidInput
from sage_server.export import export_settings, import_settings
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from sage_server.store.postgres_documents import PostgresWriter
from sage_server.store.sqlite_documents import SqliteWriter
from tests.conftest import make_settings, sage_env, sage_runner
from tests.postgres_support import scratch_database

pytestmark = pytest.mark.anyio


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with scratch_database() as url:
        yield url


def doc(doc_id: str, body: str = "# Title\n\nText.\n", **fields: object) -> DocumentIn:
    return DocumentIn.model_validate(
        {"id": doc_id, "title": doc_id.title(), "layer": "practices", "body": body, **fields}
    )


async def fill(kb: KnowledgeService) -> dict[str, str]:
    """Every kind of row: revisions, a soft delete, a restore, aliases, translations, keys in every state, audit."""
    await kb.save(doc("note", tags=["a"], aliases=["old-note"], related=["honesty"]))
    translations = {"de": {"title": "Notiz", "summary": "kurz"}}
    await kb.save(doc("note", "# Title\n\nChanged.\n", aliases=["old-note"], translations=translations))
    await kb.save(doc("gone"))
    await kb.delete("gone")
    await kb.save(doc("back"))
    await kb.delete("back")
    await kb.restore("back", 1)
    tokens = {name: (await kb.create_key(name, "write")).token for name in ("kept", "revoked")}
    await kb.revoke_key("revoked")
    await kb.create_key("expiring", "read", expires_in_days=30)
    kb.audit.failures.add("10.0.0.9", "unknown_key")
    await kb.audit.flush()
    return tokens


def records(path: Path) -> list[dict[str, Any]]:
    with export_format.open_for_reading(path) as lines:
        return [json.loads(line) for line in list(lines)[1:-1]]


def header(path: Path) -> dict[str, Any]:
    with export_format.open_for_reading(path) as lines:
        first: dict[str, Any] = json.loads(lines.readline())
        return first


def same_knowledge_base(later: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> bool:
    """Every record alike; the later trail starts with the earlier one (the import, and what was done after it,
    follow)."""
    trail = [r for r in earlier if r["type"] == "audit"]
    later_trail = [r for r in later if r["type"] == "audit"]
    rest = [r for r in later if r["type"] != "audit"]
    return rest == [r for r in earlier if r["type"] != "audit"] and later_trail[: len(trail)] == trail


async def authenticates(kb: KnowledgeService, token: str) -> int:
    kb.ready = True
    app = create_app(kb.settings, kb)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            return (await http.get("/v1/info", headers={"Authorization": f"Bearer {token}"})).status_code


async def test_sqlite_to_postgresql_and_back_loses_nothing(tmp_path: Path, knowledge: Path, postgres_url: str) -> None:
    first = make_settings(tmp_path / "a", knowledge_dirs=[knowledge])
    async with open_service(first) as kb:
        tokens = await fill(kb)
        before = await kb.history("note")
        old_identity = kb.database_id
    exported = tmp_path / "a.export.jsonl.gz"
    report = await export_settings(first, exported)
    assert report.counts["document"] == 7 and report.counts["key"] == 3 and report.counts["revision"] >= 4
    assert exported.read_bytes()[:2] == b"\x1f\x8b" and export_format.checksum_path(exported).is_file()
    assert header(exported)["backend"] == "sqlite" and header(exported)["database_id"] == old_identity

    on_postgres = make_settings(tmp_path / "b", database_url=postgres_url)
    moved = await import_settings(on_postgres, exported, replace=False, force=False)
    assert moved.source_backend == "sqlite" and moved.database_id != old_identity
    async with open_service(on_postgres) as kb:
        assert kb.generation == moved.generation > header(exported)["generation"]
        assert (await kb.history("note")).revisions == before.revisions  # content and numbering
        assert (await kb.get("old-note")).id == "note"  # the alias
        assert (await kb.history("gone")).deleted
        assert (await kb.get("back")).revision == 3
        if kb.store.searchable:  # once PostgreSQL has its full-text index, the loaded documents must be in it
            assert [hit.id for hit in (await kb.search("changed")).hits] == ["note"]
        assert await authenticates(kb, tokens["kept"]) == 200  # a key made on SQLite works on PostgreSQL
        assert await authenticates(kb, tokens["revoked"]) == 401
        trail = [(e.operation, e.target) for e in (await kb.audit_trail(limit=1000)).entries]
        assert ("key_revoke", "revoked") in trail and trail[-1] == ("import_export", str(exported))
    from_postgres = tmp_path / "b.export.jsonl"  # uncompressed works too
    await export_settings(on_postgres, from_postgres)
    assert header(from_postgres)["backend"] == "postgresql"
    assert same_knowledge_base(records(from_postgres), records(exported))

    back = make_settings(tmp_path / "c")
    await import_settings(back, from_postgres, replace=False, force=False)
    again = tmp_path / "c.export.jsonl.gz"
    await export_settings(back, again)
    assert same_knowledge_base(records(again), records(exported))
    async with open_service(back) as kb:
        assert [hit.id for hit in (await kb.search("changed")).hits] == ["note"]  # the index holds the loaded text
        assert await authenticates(kb, tokens["kept"]) == 200
    assert backup.verify(back.db_path, thorough=True).ok  # FTS index, hashes and revision chains all sound


async def test_import_checks_the_checksum_and_the_export(tmp_path: Path, knowledge: Path) -> None:
    source = make_settings(tmp_path / "a", knowledge_dirs=[knowledge])
    async with open_service(source):
        pass
    exported = tmp_path / "a.export.jsonl"
    await export_settings(source, exported)
    target = make_settings(tmp_path / "b")
    text = exported.read_text().replace("Honesty", "Dishonesty", 1)
    exported.write_text(text)
    with pytest.raises(InvalidInput, match="sha256 is .* says"):
        await import_settings(target, exported, replace=False, force=False)
    with pytest.raises(InvalidInput, match="content hashes"):  # the checksum skipped, the hashes still hold
        await import_settings(target, exported, replace=False, force=False, checksum=False)
    lines = exported.read_text().splitlines()
    exported.write_text("\n".join(lines[:-2]) + "\n")  # cut short
    export_format.write_checksum(exported)
    with pytest.raises(InvalidInput, match="cut short"):
        await import_settings(target, exported, replace=False, force=False)
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"hello": 1}\n')
    export_format.write_checksum(junk)
    with pytest.raises(InvalidInput, match="not a SAGE export"):
        await import_settings(target, junk, replace=False, force=False)
    assert not target.db_path.exists() or (await export_settings(target, tmp_path / "t.jsonl")).counts["document"] == 0
    with pytest.raises(InvalidInput, match="no such database file"):
        await export_settings(make_settings(tmp_path / "nowhere"), tmp_path / "n.jsonl")


async def test_an_export_restores_a_sqlite_store_too(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge])
    async with open_service(settings) as kb:
        await kb.save(doc("kept"))
        made = await export_settings(settings, tmp_path / "sage-1.export.jsonl.gz")
        await kb.save(doc("later"))
        identity = kb.database_id
    saved = await anyio.to_thread.run_sync(backup.restore_store, settings, Path(made.path))
    assert saved is not None and Path(saved).name.startswith("pre-restore-")
    async with open_service(settings) as kb:
        assert (await kb.info()).documents == 5 and kb.database_id != identity
        trail = [e.operation for e in (await kb.audit_trail(limit=1000)).entries]
        assert "restore_backup" in trail
    assert backup.verify(settings.db_path, thorough=True).ok


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_non_empty_target_is_refused_unless_replaced_and_a_failed_import_changes_nothing(
    tmp_path: Path, knowledge: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_settings(tmp_path / "a", knowledge_dirs=[knowledge])
    async with open_service(source) as kb:
        await kb.save(doc("from-source"))
    exported = tmp_path / "a.export.jsonl.gz"
    await export_settings(source, exported)
    async with scratch_database() as url:
        target = make_settings(tmp_path / "b", database_url=url if backend == "postgresql" else None)
        async with open_service(target) as kb:
            await kb.save(doc("only-in-target"))
            generation_before, identity_before = kb.generation, kb.database_id
        with pytest.raises(Conflict, match="not empty .*--replace"):
            await import_settings(target, exported, replace=False, force=False)

        writer = PostgresWriter if backend == "postgresql" else SqliteWriter
        original = writer.load

        async def failing(self: Any, batch: Any) -> None:
            await original(self, batch)
            raise OSError("disk full")  # after the first batch is in

        monkeypatch.setattr(writer, "load", failing)
        with pytest.raises(OSError, match="disk full"):
            await import_settings(target, exported, replace=True, force=False)
        monkeypatch.setattr(writer, "load", original)
        async with open_service(target) as kb:
            assert (await kb.get("only-in-target")).revision == 1
            assert (kb.generation, kb.database_id) == (generation_before, identity_before)
            assert (await kb.info()).documents == 1

        report = await import_settings(target, exported, replace=True, force=False)
        assert report.replaced_saved_at is not None
        saved = Path(report.replaced_saved_at)
        assert saved.parent == target.backup_dir and saved.name.startswith("pre-import-")
        assert [r["id"] for r in records(saved) if r["type"] == "document"] == ["only-in-target"]
        async with open_service(target) as kb:
            assert (await kb.get("from-source")).revision == 1
            assert (await kb.info()).documents == 5
            assert kb.generation > generation_before and kb.database_id != identity_before


async def test_a_running_instance_sees_the_import_and_serves_nothing_from_before(
    tmp_path: Path, knowledge: Path, postgres_url: str
) -> None:
    source = make_settings(tmp_path / "a")
    async with open_service(source) as kb:
        await kb.save(doc("shared", "# T\n\nfrom the export\n"))
    exported = tmp_path / "a.export.jsonl.gz"
    await export_settings(source, exported)
    target = make_settings(tmp_path / "b", database_url=postgres_url)
    async with open_service(target) as running:
        await running.save(doc("shared", "# T\n\ncached before\n"))
        assert (await running.get("shared")).body == "# T\n\ncached before\n"  # now in its cache
        with pytest.raises(Conflict, match="other clients connected"):
            await import_settings(target, exported, replace=True, force=False)
        await import_settings(target, exported, replace=True, force=True)
        with anyio.fail_after(20):
            while (await running.get("shared")).body != "# T\n\nfrom the export\n":
                await anyio.sleep(0.05)


async def test_the_command_line_moves_a_knowledge_base(tmp_path: Path, knowledge: Path, postgres_url: str) -> None:
    lite = sage_runner(
        tmp_path, sage_env(tmp_path, SAGE_DB_PATH=str(tmp_path / "lite.db"), SAGE_BUNDLED_KNOWLEDGE="false")
    )
    assert lite("import", str(knowledge)).returncode == 0
    exported = tmp_path / "kb.export.jsonl.gz"
    done = await anyio.to_thread.run_sync(lite, "export", str(exported), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["document"] == 4
    pg_env = sage_env(tmp_path, SAGE_DATABASE_URL=postgres_url, SAGE_BUNDLED_KNOWLEDGE="false")
    pg = sage_runner(tmp_path, {**pg_env, "SAGE_BACKUP_DIR": str(tmp_path / "backups")})
    loaded = await anyio.to_thread.run_sync(pg, "import", "--from-export", str(exported))
    assert loaded.returncode == 0, loaded.stderr
    assert "4 documents" in loaded.stdout
    again = await anyio.to_thread.run_sync(pg, "import", "--from-export", str(exported))
    assert again.returncode != 0 and "--replace" in again.stderr
    both = await anyio.to_thread.run_sync(pg, "import", "--from-export", str(exported), str(knowledge))
    assert both.returncode == 2 and "--from-export" in both.stderr
    info = await anyio.to_thread.run_sync(pg, "info", "--json")
    assert json.loads(info.stdout)["documents"] == 4
    with gzip.open(exported, "rt") as lines:
        assert json.loads(lines.readline())["format"] == "sage-export"
