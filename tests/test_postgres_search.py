"""Reading the index's query syntax on PostgreSQL: the FTS5 expressions search.py builds become trees of phrases
(no database needed); the index kept by the triggers holds exactly the live documents, and holds the same whichever
way they arrive (a bulk load, saves one by one, or 0002's row trigger)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sage_server import search
from sage_server.errors import InvalidInput
from sage_server.models import DocumentIn
from sage_server.service import open_service
from sage_server.store import Source, postgres_documents
from sage_server.store.postgres import PostgresStore, postgres_migrations
from sage_server.store.postgres_search import ALL_FIELDS, CJK_FIELD, Node, Phrase, parse, phrases
from tests.conftest import make_settings
from tests.postgres_support import scratch_database

META = frozenset({0, 1, 2, 3})


def test_the_expressions_ranking_builds_are_read_as_phrases() -> None:
    query = search.parse_query('retry "circuit breaker" direc* 密钥管理')
    tree = parse(query.fts())
    assert isinstance(tree, Node) and tree.op == "or"
    found = phrases(tree)
    assert found[:3] == [
        Phrase("retry", False, ALL_FIELDS),
        Phrase("circuit breaker", False, ALL_FIELDS),
        Phrase("direc", True, ALL_FIELDS),
    ]
    cjk = frozenset({CJK_FIELD})
    assert found[3:] == [Phrase(text, False, cjk) for text in ("密钥 钥管 管理", "密钥", "钥管", "管理")]
    assert parse(query.fts_all()).op == "and"  # type: ignore[union-attr]


def test_column_filters_precedence_and_quotes() -> None:
    tree = parse('{title tags triggers summary} : "retry"* AND "a" OR "say ""hi"""')
    assert tree == Node(
        "or",
        (
            Node("and", (Phrase("retry", True, META), Phrase("a", False, ALL_FIELDS))),
            Phrase('say "hi"', False, ALL_FIELDS),
        ),
    )
    assert parse('cjk : "中"*') == Phrase("中", True, frozenset({CJK_FIELD}))


@pytest.mark.parametrize("fts", ['"a" NOT "b"', 'nosuch : "a"', '("a"', '"a" )', ""])
def test_what_ranking_never_builds_is_refused_clearly(fts: str) -> None:
    with pytest.raises(InvalidInput, match="search expression"):
        parse(fts)


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with scratch_database() as url:
        yield url


@pytest.mark.anyio
async def test_the_index_holds_exactly_the_live_documents(tmp_path: Path, postgres_url: str) -> None:
    def doc(doc_id: str, body: str) -> DocumentIn:
        return DocumentIn.model_validate({"id": doc_id, "title": doc_id, "layer": "practices", "body": body})

    async with open_service(make_settings(tmp_path, database_url=postgres_url)) as kb:
        for n in range(5):
            await kb.save(doc(f"d{n}", f"Words {n} and 中文 text."))
        await kb.save(doc("d1", "Changed words."))
        await kb.delete("d2")
        await kb.delete("d3")
        await kb.restore("d3", 1)
        await kb.delete("d4")
        await kb.purge("d4")
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        cursor = await conn.execute(
            "SELECT (SELECT documents FROM search_totals), (SELECT tokens FROM search_totals), "
            "(SELECT sum(length) FROM search_documents), "
            "(SELECT array_agg(key ORDER BY key) FROM documents WHERE deleted_at IS NULL), "
            "(SELECT array_agg(DISTINCT doc_key ORDER BY doc_key) FROM search_terms), "
            "(SELECT array_agg(doc_key ORDER BY doc_key) FROM search_documents)"
        )
        documents, tokens, lengths, live, with_terms, indexed = await cursor.fetchone() or ()
    assert documents == len(live) == 3 and tokens == lengths
    assert with_terms == indexed == live
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("TRUNCATE documents CASCADE")
        cursor = await conn.execute(
            "SELECT (SELECT documents FROM search_totals), (SELECT count(*) FROM search_terms), "
            "(SELECT count(*) FROM search_documents)"
        )
        assert await cursor.fetchone() == (0, 0, 0)


WORDS = [
    "access",
    "logs",
    "café",
    "naïve",
    "rotation",
    "keys",
    "deploying",
    "检查访问日志",
    "密钥",
    "x86_64",
    "O'Brien",
]
QUERIES = ["access logs", "rotation", "cafe", "检查访问日志", "deploy*", "title 3", "naive keys"]


def varied(n: int) -> DocumentIn:
    """Documents with every indexed field set, accents, CJK runs and translations, differing from one another."""
    word = [WORDS[(n * k + k) % len(WORDS)] for k in range(40)]
    return DocumentIn.model_validate(
        {
            "id": f"doc-{n}",
            "title": f"Title {n} {word[0]}",
            "layer": "practices",
            "tags": [f"tag{n % 3}", "shared"],
            "triggers": [f"when {word[1]}"],
            "summary": f"Summary of {word[2]}, number {n}.",
            "body": f"# Heading {n} {word[3]}\n\n{' '.join(word)}.\n\n## More\n\nText {n}: {word[4]} 中文 text.\n",
            "translations": {"zh": {"title": f"标题{n}", "summary": "摘要"}} if n % 2 else {},
            "aliases": [f"alias-{n}"] if n % 4 == 0 else [],
        }
    )


INDEX_CONTENTS = (
    "SELECT d.id, t.term, t.field, t.tf FROM search_terms t JOIN documents d ON d.key = t.doc_key ORDER BY 1, 2, 3",
    "SELECT d.id, s.length, s.vector::text, s.cjk FROM search_documents s JOIN documents d ON d.key = s.doc_key "
    "ORDER BY 1",
    "SELECT documents, tokens FROM search_totals",
    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'search_terms' ORDER BY 1",
)


async def index_of(url: str) -> list[list[Any]]:
    """Everything the index holds, by document id (keys differ between databases), and its B-trees."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        return [await (await conn.execute(sql)).fetchall() for sql in INDEX_CONTENTS]


async def terms_index_oid(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        row = await (await conn.execute("SELECT 'search_terms_pkey'::regclass::oid")).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.anyio
async def test_a_bulk_load_indexes_and_ranks_as_saves_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_documents, "COPY_DOCUMENTS", 5)  # three COPY statements, and the B-trees rebuilt
    docs = [varied(n) for n in range(13)]
    ranked: dict[str, list[list[tuple[str, float]]]] = {}
    async with scratch_database() as bulk_url, scratch_database() as single_url:
        for name, url in (("bulk", bulk_url), ("single", single_url)):
            async with open_service(make_settings(tmp_path / name, database_url=url)) as kb:
                if name == "bulk":
                    before = await terms_index_oid(url)
                    async with kb.store.transaction() as writer:
                        await writer.insert_many([(doc, Source()) for doc in docs])
                    assert await terms_index_oid(url) != before  # dropped and built again
                else:
                    for doc in docs:
                        await kb.save(doc)
                ranked[name] = [
                    [(hit.id, hit.score) for hit in (await kb.search(query, limit=10)).hits] for query in QUERIES
                ]
        bulk, single = await index_of(bulk_url), await index_of(single_url)
    assert bulk == single
    assert len({row[0] for row in bulk[0]}) == len(docs) and bulk[2] == [(len(docs), sum(r[1] for r in bulk[1]))]
    assert ranked["bulk"] == ranked["single"] and all(ranked["bulk"])


@pytest.mark.anyio
async def test_the_statement_triggers_index_as_the_row_trigger_of_0002_did(tmp_path: Path) -> None:
    old_migrations = tmp_path / "0002"
    old_migrations.mkdir()
    # 0003 only adds a column the writes fill; the row trigger is 0002's until 0004 replaces it.
    for name in ("0001_initial.sql", "0002_full_text.sql", "0003_source_stat.sql"):
        shutil.copy(postgres_migrations() / name, old_migrations / name)

    async def write(store: PostgresStore, docs: list[DocumentIn]) -> None:
        async with store.transaction() as writer:
            await writer.insert_many([(doc, Source()) for doc in docs])
        async with store.transaction() as writer:
            changed = await writer.document("doc-1")
            gone = await writer.document("doc-2")
            assert changed is not None and gone is not None
            await writer.replace(changed.ref, varied(7).model_copy(update={"id": "doc-1"}), Source(), "update")
            await writer.soft_delete(gone.ref, "delete")

    async with scratch_database() as old_url, scratch_database() as new_url:
        for url, migrations in ((old_url, old_migrations), (new_url, None)):
            store = PostgresStore(url, pool_size=2, migrations=migrations)
            await store.open()
            try:
                await write(store, [varied(n) for n in range(6)])
            finally:
                await store.close()
        assert await index_of(old_url) == await index_of(new_url)
        # The database indexed by 0002 migrates to the statement triggers and goes on alike.
        for url in (old_url, new_url):
            store = PostgresStore(url, pool_size=2)
            await store.open()
            try:
                async with store.transaction() as writer:
                    await writer.insert_many([(varied(9), Source())])
                    await writer.purge((await writer.document("doc-3") or pytest.fail("doc-3")).ref)
            finally:
                await store.close()
        assert await index_of(old_url) == await index_of(new_url)
