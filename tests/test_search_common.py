"""Words in half the documents or more, on both stores: BM25 weighs them at its floor (IDF 1e-6), so the any-term
query leaves them out when other words can fill the candidates (search.Plan.fts_weighing) and the order stays
what the whole query gives; and a count estimated that high is made exact before a word is left out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sage_server import search
from sage_server.config import Settings
from sage_server.service import KnowledgeService, open_service
from tests.conftest import BACKENDS, database_for, make_settings, write_doc

pytestmark = pytest.mark.anyio
DOCUMENTS = 1200
CLUSTERED = 550  # the first documents imported hold it: under half, though its first matches say "all of them"
RARE_EVERY = 100  # one document in this many holds the rare word (12 of them)


@pytest.fixture(params=BACKENDS)
async def settings_of(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Settings]:
    async with database_for(request.param) as database:
        yield make_settings(tmp_path, **database)


@pytest.fixture
async def kb(settings_of: Settings, tmp_path: Path) -> AsyncIterator[KnowledgeService]:
    folder = tmp_path / "corpus"
    for n in range(DOCUMENTS):
        words = ["omnipresent"]
        if n < CLUSTERED:
            words += ["clustered"] * (1 + n % 3)
        if n % RARE_EVERY == 7:
            words.append("rarity")
        # Every body a different length, so no two documents tie on BM25 and the order is the same either way.
        body = " ".join(words + ["filler"] * n)
        write_doc(folder, f"practices/note-{n:04d}.md", f"# Note {n}\n\n{body}\n")
    async with open_service(settings_of) as service:
        report = await service.import_paths([folder])
        assert report.created == DOCUMENTS
        yield service


async def _plan(kb: KnowledgeService, query: str) -> search.Plan:
    async with kb.store.read() as reader:
        return await search.plan(reader, search.parse_query(query))


async def _ranked(kb: KnowledgeService, query: str, limit: int) -> list[tuple[str, float]]:
    async with kb.store.read() as reader:
        plan = await search.plan(reader, search.parse_query(query))
        return [(item.row.id, round(item.score, 6)) for item in await search.rank(reader, plan, None, None, limit)]


async def test_a_count_estimated_common_is_made_exact(kb: KnowledgeService) -> None:
    plan = await _plan(kb, "omnipresent clustered")
    assert {term.term.text: term.df for term in plan.terms} == {"omnipresent": DOCUMENTS, "clustered": CLUSTERED}
    # Only the word in every document is left out of the any-term query.
    assert plan.fts_weighing() == plan.terms[1].fts()


async def test_nothing_is_left_out_when_every_word_or_none_is_common(kb: KnowledgeService) -> None:
    assert (await _plan(kb, "omnipresent filler")).fts_weighing() is None
    assert (await _plan(kb, "clustered rarity")).fts_weighing() is None


async def test_leaving_common_words_out_keeps_the_order(kb: KnowledgeService, monkeypatch: pytest.MonkeyPatch) -> None:
    # The documents holding "clustered" fill the candidates: the lighter query is the one that runs.
    lighter = await _ranked(kb, "omnipresent clustered", 30)
    monkeypatch.setattr(search.Plan, "fts_weighing", lambda self: None)
    whole = await _ranked(kb, "omnipresent clustered", 30)
    assert lighter == whole
    assert len(lighter) == 30


async def test_too_few_documents_hold_the_rest_so_the_whole_query_runs(kb: KnowledgeService) -> None:
    ranked = await _ranked(kb, "omnipresent rarity", 20)
    rare = DOCUMENTS // RARE_EVERY
    assert len(ranked) == 20  # the lighter query found 12: documents holding only the common word come after
    holding = {f"practices.note-{n:04d}" for n in range(DOCUMENTS) if n % RARE_EVERY == 7}
    assert {doc_id for doc_id, _ in ranked[:rare]} == holding
