"""The second source of search candidates, on both stores: documents holding the query's words close together
are re-scored even when BM25 ranks them past the re-scored head (search.CLOSE_CANDIDATES)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sage_server import search
from sage_server.config import Settings
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from tests.conftest import BACKENDS, database_for, make_settings

pytestmark = pytest.mark.anyio
QUERY = "zorblax quintessa vembrook"


@pytest.fixture(params=BACKENDS)
async def settings_of(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Settings]:
    async with database_for(request.param) as database:
        yield make_settings(tmp_path, **database)


@pytest.fixture
async def kb(settings_of: Settings) -> AsyncIterator[KnowledgeService]:
    async with open_service(settings_of) as service:
        # Documents BM25 prefers (each word often, in a short text), holding the words far apart ...
        gap = " filler" * 30
        for n in range(4):
            body = f"zorblax zorblax{gap} quintessa quintessa{gap} vembrook vembrook {n}"
            await service.save(DocumentIn(id=f"scattered-{n}", title=f"Scattered {n}", layer="practices", body=body))
        # ... and the one holding them in one sentence, in a longer text.
        body = "The zorblax meets a quintessa by the vembrook." + " other words" * 40
        await service.save(DocumentIn(id="together", title="Together", layer="practices", body=body))
        yield service


async def test_the_index_finds_the_documents_holding_the_words_closest(kb: KnowledgeService) -> None:
    async with kb.store.read() as reader:
        plan = await search.plan(reader, search.parse_query(QUERY))
        groups = search.close_groups(plan)
        rows = await reader.rank_close_together(groups, search.CLOSE_DISTANCE, None, None, 1)
        assert [row.id for row in rows] == ["together"]
        everything = await reader.rank_documents(plan.fts_all(), None, None, 10, 0)
        assert [row.id for row in everything][0] != "together"  # BM25 alone ranks it lower
        assert await reader.rank_close_together(groups, search.CLOSE_DISTANCE, ["core"], None, 5) == []


async def test_they_are_re_scored_beyond_the_bm25_head(kb: KnowledgeService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "CANDIDATES", 2)
    monkeypatch.setattr(search, "ENOUGH_HOLDING_ALL", 2)
    assert (await kb.search(QUERY)).hits[0].id == "together"
    # Without the second source it is never re-scored, and BM25's order stands (the query's text differs, so the
    # answer is not the one cached above).
    monkeypatch.setattr(search, "CLOSE_CANDIDATES", 0)
    hits = (await kb.search(QUERY + "?")).hits
    assert hits[0].id.startswith("scattered-") and "together" in [hit.id for hit in hits]
    # Nor when its words are in too many documents for the search to pay for it.
    monkeypatch.setattr(search, "CLOSE_CANDIDATES", 30)
    monkeypatch.setattr(search, "CLOSE_MAX_DOCUMENTS", 4)
    assert (await kb.search(QUERY + "!")).hits[0].id.startswith("scattered-")


def test_queries_of_one_term_many_terms_or_chinese_have_no_groups() -> None:
    def plan(*terms: search.Term) -> search.Plan:
        return search.Plan(
            search.ParsedQuery(list(terms)), [search.PlannedTerm(t, t.text, 1, 1.0, (t.text,)) for t in terms], 10
        )

    word, other = search.Term("zorblax", "word"), search.Term("quint", "prefix")
    assert search.close_groups(plan(word, other)) == [['"zorblax"', '"quint"*']]
    assert search.close_groups(plan(word)) == []
    assert search.close_groups(plan(word, search.Term("密钥", "cjk"))) == []
    many = [search.Term(f"w{n}", "word") for n in range(search.ALL_TERMS_FIRST + 1)]
    assert search.close_groups(plan(*many)) == []
    typo = plan(word, other)
    typo.terms[0].alternative = search.Term("zorb", "prefix")
    assert search.close_groups(typo) == [['"zorblax"', '"quint"*'], ['"zorb"*', '"quint"*']]
