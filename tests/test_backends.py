"""The same behaviour on both stores: every test here runs on SQLite and on PostgreSQL (a database of its own,
created and dropped), and search ranks alike on both (the same documents in the same order, with close scores)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import psycopg
import pytest
from mcp import Client
from psycopg.rows import dict_row

from sage_server import importing
from sage_server import service as service_module
from sage_server.app import create_app
from sage_server.assistant import build_server
from sage_server.config import Settings
from sage_server.errors import Conflict, MigrationError, NotFound, StaleRevision
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from sage_server.store.migrations import migration_files
from sage_server.store.postgres import PostgresStore, migrate, postgres_migrations
from sage_server.store.postgres_documents import PostgresWriter
from sage_server.store.sqlite_documents import SqliteWriter
from tests.conftest import make_settings, sage_env, sage_runner, write_doc
from tests.mcp_support import error_text, payload
from tests.postgres_support import scratch_database

pytestmark = pytest.mark.anyio
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
async def backend_settings(request: pytest.FixtureRequest, tmp_path: Path, knowledge: Path) -> AsyncIterator[Settings]:
    if request.param == "sqlite":
        yield make_settings(tmp_path, knowledge_dirs=[knowledge])
        return
    async with scratch_database() as url:
        yield make_settings(tmp_path, knowledge_dirs=[knowledge], database_url=url)


@pytest.fixture
async def kb(backend_settings: Settings) -> AsyncIterator[KnowledgeService]:
    async with open_service(backend_settings) as service:
        yield service


def doc(doc_id: str, body: str = "# Title\n\nText.\n", **fields: object) -> DocumentIn:
    return DocumentIn.model_validate(
        {"id": doc_id, "title": doc_id.title(), "layer": "practices", "body": body, **fields}
    )


def backend_of(settings: Settings) -> str:
    return "postgresql" if settings.database_url is not None else "sqlite"


async def test_info_and_health_name_the_backend(kb: KnowledgeService, backend_settings: Settings) -> None:
    info = await kb.info()
    assert info.backend == backend_of(backend_settings)
    assert info.documents == 4 and info.layers["core"] == 1
    health = await kb.health()
    assert health.backend == backend_of(backend_settings) and health.components["knowledge"] == "healthy"
    if info.backend == "postgresql":
        assert info.db_path.startswith("postgresql://") and health.components["backup"] == "healthy"


async def test_revisions_soft_delete_restore_and_purge(kb: KnowledgeService) -> None:
    first = await kb.save(doc("note", tags=["a"], aliases=["old-note"]))
    second = await kb.save(doc("note", "# Title\n\nChanged.\n", tags=["a", "b"]))
    assert (first.revision, second.revision) == (1, 2)
    assert (await kb.save(doc("note", "# Title\n\nChanged.\n", tags=["a", "b"]))).revision == 2  # identical: kept
    deleted = await kb.delete("note")
    assert deleted.deleted and deleted.revision == 3
    with pytest.raises(NotFound, match="was deleted at revision 3"):
        await kb.get("note")
    history = await kb.history("note")
    assert history.deleted and [r.revision for r in history.revisions] == [3, 2, 1]
    assert [r.change for r in history.revisions] == ["delete", "update", "create"]
    restored = await kb.restore("note", 1)
    assert (restored.revision, restored.body, restored.deleted) == (4, "# Title\n\nText.\n", False)
    assert (await kb.get("old-note")).id == "note"  # an alias of the first revision is back
    with pytest.raises(Conflict, match="is live"):
        await kb.purge("note")
    await kb.delete("note")
    await kb.purge("note")
    with pytest.raises(NotFound):
        await kb.history("note")


async def test_optimistic_concurrency(kb: KnowledgeService) -> None:
    await kb.save(doc("race"), expected_revision=0)
    with pytest.raises(StaleRevision) as stale:
        await kb.save(doc("race", "# T\n\nmine\n"), expected_revision=0)
    assert stale.value.details["current_revision"] == 1
    await kb.save(doc("race", "# T\n\nmine\n"), expected_revision=1)
    with pytest.raises(StaleRevision):
        await kb.delete("race", expected_revision=1)
    assert (await kb.delete("race", expected_revision=2)).revision == 3


async def test_listing_orders_filters_and_pages_alike(kb: KnowledgeService) -> None:
    for doc_id in ("b-2", "b_1", "b.3", "B4"):
        await kb.save(doc(doc_id, tags=["paged"]))
    page = await kb.list(layer="practices", tags=["paged"], limit=3)
    # Bytewise order, as SQLite sorts: upper case first, then '-', '.', '_'.
    assert [item.id for item in page.items] == ["B4", "b-2", "b.3"] and page.total == 4
    assert page.next_cursor is not None
    rest = await kb.list(layer="practices", tags=["paged"], limit=3, cursor=page.next_cursor)
    assert [item.id for item in rest.items] == ["b_1"] and rest.next_cursor is None


async def test_incremental_import(kb: KnowledgeService, knowledge: Path) -> None:
    again = await kb.import_paths([knowledge])
    assert (again.created, again.updated, again.removed, again.unchanged) == (0, 0, 0, 4)
    write_doc(knowledge, "practices/new.md", "# New\n\nFresh.\n")
    write_doc(knowledge, "frameworks/timeouts.md", "# Timeouts\n\nRewritten.\n")
    (knowledge / "scenarios/plain-note.md").unlink()
    report = await kb.import_paths([knowledge])
    assert (report.created, report.updated, report.removed, report.unchanged) == (1, 1, 1, 2)
    assert (await kb.get("timeout-resilience")).revision == 2
    assert (await kb.history("scenarios.plain-note")).deleted
    write_doc(knowledge, "scenarios/plain-note.md", "# Back\n\nAgain.\n")
    back = await kb.import_paths([knowledge])
    assert (back.created, back.updated) == (0, 1)  # a file that returns brings its document (and history) back
    assert (await kb.get("scenarios.plain-note")).revision == 3


async def test_two_instances_importing_at_once_neither_duplicate_nor_lose(
    backend_settings: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "many"
    for n in range(40):
        write_doc(folder, f"practices/n{n}.md", f"# Note {n}\n\nText {n}.\n")
    async with open_service(backend_settings) as one, open_service(backend_settings) as two:
        reports = []

        async def run(service: KnowledgeService) -> None:
            reports.append(await service.import_paths([folder]))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run, one)
            tasks.start_soon(run, two)
        assert sorted(r.created for r in reports) == [0, 40]
        assert sum(r.unchanged for r in reports) >= 40
        listed = await one.list(layer="practices", limit=100)
        assert listed.total == 41 and len({item.id for item in listed.items}) == 41


async def test_generations_and_the_change_log(kb: KnowledgeService) -> None:
    before = kb.generation
    await kb.save(doc("moving"))
    await kb.save(doc("moving").model_copy(update={"layer": "scenarios"}))
    assert kb.generation == before + 2
    async with kb.store.read() as reader:
        assert await reader.generation() == kb.generation
        log = await reader.changes_after(before, 10)
    assert log.complete and log.newest == kb.generation
    assert [(g - before, doc_id, layer, listed) for g, doc_id, layer, listed in log.rows] == [
        (1, "moving", "practices", True),  # created
        (2, "moving", "scenarios", True),  # moved: the layer it is in now
        (2, "moving", "practices", True),  # and the one it left
    ]


async def test_keys_and_the_audit_trail(kb: KnowledgeService) -> None:
    created = await kb.create_key("ci", "write", expires_in_days=30)
    with pytest.raises(Conflict, match="exists"):
        await kb.create_key("ci", "read")
    assert [(k.name, k.scope, k.revoked_at) for k in (await kb.list_keys()).keys] == [("ci", "write", None)]
    revoked = await kb.revoke_key("ci")
    assert revoked.revoked_at is not None
    with pytest.raises(NotFound):
        await kb.revoke_key("ci")
    loaded = await kb.keys.load()
    assert [digest for _, digest in loaded] != [created.token]
    kb.audit.failures.add("10.0.0.9", "unknown_key")
    kb.audit.failures.add("10.0.0.9", "unknown_key")
    await kb.audit.flush()
    entries = (await kb.audit_trail(limit=1000)).entries
    outcomes = [(e.operation, e.target, e.outcome) for e in entries]
    assert ("key_create", "ci", "ok") in outcomes and ("key_create", "ci", "conflict") in outcomes
    assert ("key_revoke", "ci", "not_found") in outcomes
    failures = [e for e in entries if e.operation == "authenticate"]
    assert [(e.client, e.count) for e in failures] == [("10.0.0.9", 2)]


async def test_an_unknown_id_suggests_close_ones(kb: KnowledgeService) -> None:
    with pytest.raises(NotFound) as missing:
        await kb.get("handling-secret")
    assert "handling-secrets" in missing.value.details["suggestions"]


# -- search and context ----------------------------------------------------------------------------------------------


async def test_search_finds_words_stems_prefixes_typos_and_chinese(kb: KnowledgeService) -> None:
    async def first(query: str, **filters: Any) -> str | None:
        hits = (await kb.search(query, **filters)).hits
        return hits[0].id if hits else None

    assert await first("retrying with backoff") == "timeout-resilience"  # a stem: retrying -> retri
    assert await first("credentials in logs") == "handling-secrets"
    assert await first("resil*") == "timeout-resilience"
    assert await first("circiut braker") == "timeout-resilience"  # typos corrected
    assert await first("密钥") == "handling-secrets"  # two Chinese characters
    assert await first("检查访问日志") == "handling-secrets"  # a Chinese phrase inside a sentence
    assert await first('"exponential backoff"') == "timeout-resilience"
    assert await first("stabilisé") == "scenarios.plain-note"  # accents folded
    assert await first("key", layers=["core"]) is None
    assert await first("deadline", tags=["timeouts"]) == "timeout-resilience"
    assert await first("deadline", tags=["security"]) is None


async def test_search_follows_every_write(kb: KnowledgeService) -> None:
    await kb.save(doc("animal-note", "# Quokka care\n\nFeed the quokka leaves.\n", tags=["animals"]))
    assert [hit.id for hit in (await kb.search("quokka")).hits] == ["animal-note"]
    await kb.save(doc("animal-note", "# Wombat care\n\nFeed the wombat grass.\n"))
    assert (await kb.search("quokka")).hits == []
    assert [hit.id for hit in (await kb.search("wombat")).hits] == ["animal-note"]
    await kb.delete("animal-note")
    assert (await kb.search("wombat")).hits == []
    await kb.restore("animal-note", 1)
    assert [hit.id for hit in (await kb.search("quokka")).hits] == ["animal-note"]
    assert (await kb.search("wombat")).hits == []
    await kb.delete("animal-note")
    await kb.purge("animal-note")
    assert (await kb.search("quokka")).hits == []


async def test_context_packs_the_relevant_sections(kb: KnowledgeService) -> None:
    packed = await kb.context("rotate a leaked api key", max_tokens=2000)
    assert "handling-secrets" in [section.id for section in packed.sections]
    assert "Rotate a leaked key at once." in packed.text


QUERIES = [
    "retry budget",
    "circuit breaker",
    "key",
    "verified tests",
    "credentials logs api",
    "deadline*",
    '"circuit breaker" failing',
    "密钥管理",
    "密钥",
    "production incident cause",
    "stabilisé",
    "retriez",
]


async def test_both_stores_rank_alike(tmp_path: Path, knowledge: Path) -> None:
    extra = [
        doc(f"note-{n}", f"# Note {n}\n\n" + " ".join(["retry budget circuit"[: 5 + n]] * (n + 1)) + " key logs.\n")
        for n in range(8)
    ]
    found: dict[str, dict[str, list[tuple[str, float]]]] = {}
    explained: dict[str, dict[str, float]] = {}
    async with scratch_database() as url:
        for backend, settings in {
            "sqlite": make_settings(tmp_path / "s", knowledge_dirs=[knowledge]),
            "postgresql": make_settings(tmp_path / "p", knowledge_dirs=[knowledge], database_url=url),
        }.items():
            async with open_service(settings) as service:
                for item in extra:
                    await service.save(item)
                found[backend] = {}
                for query in QUERIES:
                    hits = (await service.search(query, limit=10)).hits
                    found[backend][query] = [(hit.id, hit.score) for hit in hits]
                why = (await service.search("retry budget key", limit=1, explain=True)).hits[0].explain
                assert why is not None
                explained[backend] = {"bm25": why.bm25, **why.bm25_fields}
    for query in QUERIES:
        sqlite, postgres = found["sqlite"][query], found["postgresql"][query]
        assert [hit for hit, _ in postgres] == [hit for hit, _ in sqlite], query
        assert [score for _, score in postgres] == pytest.approx([score for _, score in sqlite], abs=0.01), query
    assert explained["postgresql"] == pytest.approx(explained["sqlite"], rel=0.01)


# -- PostgreSQL only -------------------------------------------------------------------------------------------------


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with scratch_database() as url:
        yield url


async def test_instances_starting_at_once_migrate_once(postgres_url: str) -> None:
    stores = [PostgresStore(postgres_url, pool_size=2) for _ in range(4)]
    applied: list[list[str]] = []

    async def start(store: PostgresStore) -> None:
        applied.append(await store.open())

    try:
        async with anyio.create_task_group() as tasks:
            for store in stores:
                tasks.start_soon(start, store)
    finally:
        for store in stores:
            await store.close()
    assert sorted(applied) == [[], [], [], [path.name for path in migration_files(postgres_migrations())]]


async def test_a_changed_migration_is_refused(postgres_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    first = postgres_migrations() / "0001_initial.sql"
    (folder / first.name).write_bytes(first.read_bytes())
    connect = psycopg.AsyncConnection.connect(postgres_url, autocommit=True, row_factory=dict_row)
    async with await connect as conn:
        assert await migrate(conn, folder) == ["0001_initial.sql"]
        (folder / first.name).write_bytes(first.read_bytes() + b"\n-- edited\n")
        with pytest.raises(MigrationError, match="forward-only"):
            await migrate(conn, folder)


async def test_a_deadline_cancels_the_query_on_the_server(postgres_url: str) -> None:
    store = PostgresStore(postgres_url, pool_size=1)
    await store.open()
    try:
        with anyio.move_on_after(0.5):
            async with store.read() as reader:
                await reader.conn.execute("SELECT pg_sleep(60)")
        # The server stops it within moments (the sleep would run a minute): poll, bounded far below that.
        running = 1
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as watcher:
            with anyio.fail_after(20):
                while running:
                    cursor = await watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'"
                    )
                    row = await cursor.fetchone()
                    running = row[0] if row else 0
                    await anyio.sleep(0.1)
        async with store.read() as reader:  # the pool replaced the cancelled connection
            assert await reader.generation() == 0
    finally:
        await store.close()


async def test_instances_hear_each_others_writes_through_listen_notify(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "GENERATION_POLL_SECONDS", 3600.0)  # no poll: only NOTIFY can tell
    settings = make_settings(tmp_path, database_url=postgres_url)
    async with open_service(settings) as writer, open_service(settings) as reader:
        await writer.save(doc("shared"))
        with anyio.fail_after(20):
            while reader.generation < writer.generation:
                await anyio.sleep(0.05)
        assert (await reader.get("shared")).revision == 1  # read (and cached) at this generation
        await writer.save(doc("shared", "# Title\n\nNew.\n"))
        with anyio.fail_after(20):
            while reader.generation < writer.generation:
                await anyio.sleep(0.05)
        assert (await reader.get("shared")).body == "# Title\n\nNew.\n"  # the cached revision 1 is not served


async def test_the_rest_face_behaves_alike(kb: KnowledgeService, backend_settings: Settings) -> None:
    kb.ready = True
    app = create_app(kb.settings, kb)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            health = (await http.get("/health")).json()
            assert health["backend"] == backend_of(backend_settings) and health["status"] == "healthy"
            body = {"title": "Rate Limits", "layer": "practices", "body": "Token buckets smooth bursts."}
            assert (await http.put("/v1/knowledge/rate-limits", json=body)).status_code == 201
            url = "/v1/knowledge/rate-limits"
            stale = await http.put(url, json=body | {"body": "x"}, headers={"If-Match": '"0"'})
            assert stale.status_code == 412 and stale.json()["error"]["details"]["current_revision"] == 1
            updated = await http.put(
                "/v1/knowledge/rate-limits", json=body | {"body": "y"}, headers={"If-Match": '"1"'}
            )
            assert updated.status_code == 200 and updated.headers["etag"] == '"2"'
            listed = (await http.get("/v1/knowledge", params={"layer": "practices"})).json()
            assert [item["id"] for item in listed["items"]] == ["handling-secrets", "rate-limits"]
            assert (await http.delete("/v1/knowledge/rate-limits")).json()["deleted"] is True
            assert (await http.get("/v1/knowledge/rate-limits")).status_code == 404
            restored = await http.post("/v1/knowledge/rate-limits/restore", json={"revision": 1})
            assert restored.json()["revision"] == 4 and restored.json()["body"] == "Token buckets smooth bursts."
            search = await http.get("/v1/search", params={"q": "token buckets"})
            assert search.status_code == 200 and search.json()["hits"][0]["id"] == "rate-limits"
            chinese = await http.get("/v1/search", params={"q": "密钥"})
            assert chinese.status_code == 200 and chinese.json()["hits"][0]["id"] == "handling-secrets"


async def test_the_command_line_names_the_backend(tmp_path: Path, knowledge: Path, postgres_url: str) -> None:
    env = sage_env(tmp_path, SAGE_DATABASE_URL=postgres_url, SAGE_KNOWLEDGE_DIRS=str(knowledge))
    sage = sage_runner(tmp_path, {**env, "SAGE_BUNDLED_KNOWLEDGE": "false"})
    info = await anyio.to_thread.run_sync(sage, "info", "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["backend"] == "postgresql" and json.loads(info.stdout)["documents"] == 4
    human = await anyio.to_thread.run_sync(sage, "info")
    assert "database postgresql postgresql://" in human.stdout


async def test_an_interrupted_import_changes_nothing(
    kb: KnowledgeService, knowledge: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await kb.info()
    write_doc(knowledge, "practices/fresh.md", "# Fresh\n\ntext\n")
    write_doc(knowledge, "core/honesty.md", "# Honesty rewritten\n\nnew\n")

    async def failing_insert(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")  # by now the changed core/honesty.md is a new revision in this transaction

    writer = PostgresWriter if kb.store.backend == "postgresql" else SqliteWriter
    monkeypatch.setattr(writer, "insert_many", failing_insert)
    with pytest.raises(OSError, match="disk full"):
        await kb.import_paths([knowledge])
    after = await kb.info()
    assert (after.documents, after.generation) == (before.documents, before.generation)
    assert (await kb.get("honesty")).title == "Honesty About Verification"
    assert [r.revision for r in (await kb.history("honesty")).revisions] == [1]


async def test_the_mcp_face_behaves_alike(kb: KnowledgeService) -> None:
    async with Client(build_server(kb), raise_exceptions=True, mode="auto") as client:

        async def call(tool: str, **arguments: Any) -> dict[str, Any]:
            return payload(await client.call_tool(tool, arguments))

        doc = {"id": "retry-budgets", "title": "Retry budgets", "body": "# Retry budgets\n\nCap retries.\n"}
        assert (await call("sage_save_knowledge", **doc, expected_revision=0))["revision"] == 1
        assert (await call("sage_save_knowledge", **doc))["revision"] == 1  # identical: nothing stored
        assert (await call("sage_save_knowledge", **{**doc, "body": "At 10%.\n"}, expected_revision=1))["revision"] == 2
        stale = error_text(await client.call_tool("sage_save_knowledge", {**doc, "expected_revision": 1}))
        assert "conflict" in stale and "revision 2" in stale
        assert (await call("sage_get_document", id="retry-budgets"))["text"] == "At 10%.\n"
        assert (await call("sage_delete_knowledge", id="retry-budgets"))["deleted"] is True
        history = await call("sage_history", id="retry-budgets")
        assert [(r["revision"], r["change"]) for r in history["revisions"]] == [
            (3, "delete"),
            (2, "update"),
            (1, "create"),
        ]
        assert (await call("sage_restore_revision", id="retry-budgets", revision=1))["revision"] == 4
        assert (await call("sage_info"))["documents"] == 5
        searched = await client.call_tool("sage_search", {"query": "retries"})
        assert "retry-budgets" in [hit["id"] for hit in payload(searched)["hits"]]
        chinese = await client.call_tool("sage_search", {"query": "轮换"})
        assert [hit["id"] for hit in payload(chinese)["hits"]] == ["handling-secrets"]


async def test_a_bulk_import_refreshes_the_planner_statistics_on_postgresql(
    tmp_path: Path, knowledge: Path, postgres_url: str
) -> None:
    """Searches right after a large import were planned for empty tables (seconds each) until autovacuum ran."""

    async def analysed() -> bool:
        async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
            cursor = await conn.execute(
                "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'search_terms'"
            )
            row = await cursor.fetchone()
            return bool(row and row[0])

    bulk = tmp_path / "bulk"
    for n in range(importing.BULK_DOCUMENTS - 1):
        write_doc(bulk, f"practices/note-{n}.md", f"# Note {n}\n\nBulk text number {n}.\n")
    async with open_service(make_settings(tmp_path, knowledge_dirs=[knowledge], database_url=postgres_url)) as kb:
        await kb.import_paths([bulk])
        assert not await analysed()  # a smaller import leaves it to autovacuum
        write_doc(bulk, "practices/one-more.md", "# One more\n\nBulk text.\n")
        for n in range(importing.BULK_DOCUMENTS - 1):
            write_doc(bulk, f"practices/note-{n}.md", f"# Note {n}\n\nBulk text number {n}, revised.\n")
        await kb.import_paths([bulk])
        assert await analysed()
        assert (await kb.search("bulk text revised")).hits
