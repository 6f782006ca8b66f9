"""Reading the index's query syntax on PostgreSQL: the FTS5 expressions search.py builds become trees of phrases
(no database needed), and the index kept by the trigger holds exactly the live documents."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from sage_server import search
from sage_server.errors import InvalidInput
from sage_server.models import DocumentIn
from sage_server.service import open_service
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
