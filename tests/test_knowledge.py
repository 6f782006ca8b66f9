"""The bundled knowledge base: it lints clean, and retrieval on it holds the quality floors."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sage_server.evaluate import EvalReport, load_queries, run_eval
from sage_server.ingest import collect
from sage_server.resources import knowledge_dir
from sage_server.service import KnowledgeService, open_service
from tests.conftest import make_settings

pytestmark = pytest.mark.anyio
LINK = re.compile(r"\]\(sage:([^)\s#]+)\)")
MIN_DOCUMENTS = 48
MIN_PER_LAYER = 6


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def bundled(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KnowledgeService]:
    settings = make_settings(tmp_path_factory.mktemp("bundled"), bundled_knowledge=True)
    async with open_service(settings) as kb:
        yield kb


@pytest.fixture(scope="module")
async def report(bundled: KnowledgeService) -> EvalReport:
    return await run_eval(bundled, load_queries([knowledge_dir() / "eval.yaml"]), k=5)


def test_every_bundled_file_imports_cleanly(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    collected = collect([knowledge_dir()], settings)
    assert collected.skipped == []
    docs = [f.doc for f in collected.files]
    assert len(docs) >= MIN_DOCUMENTS
    assert len({d.id for d in docs}) == len(docs)
    per_layer = Counter(d.layer for d in docs)
    assert all(per_layer[layer] >= MIN_PER_LAYER for layer in settings.layers), per_layer
    ids = {d.id for d in docs}
    for d in docs:
        words = len(d.body.split())
        assert 200 <= words <= 1200, (d.id, words)
        assert d.title and d.summary and d.tags and d.triggers, d.id
        assert Path(next(f.path for f in collected.files if f.doc.id == d.id)).stem == d.id
        links = LINK.findall(d.body)
        assert links, f"{d.id} links to no related document"
        assert set(links) <= ids, (d.id, set(links) - ids)
    chinese = [d.id for d in docs if len(re.findall(r"[\u4e00-\u9fff]", d.body)) >= 50]
    assert len(chinese) >= 2, chinese


def test_eval_set_is_large_and_judges_real_documents(tmp_path: Path) -> None:
    queries = load_queries([knowledge_dir() / "eval.yaml"])
    ids = {f.doc.id for f in collect([knowledge_dir()], make_settings(tmp_path)).files}
    assert len(queries) >= 60
    assert {q.mode for q in queries} == {"search", "context"}
    assert sum(1 for q in queries if re.search(r"[\u4e00-\u9fff]", q.query)) >= 2
    for q in queries:
        assert set(q.relevant) <= ids, q


async def test_search_quality_floor(report: EvalReport) -> None:
    assert report.recall_at_k >= 0.90, report.recall_at_k
    assert report.mrr >= 0.75, report.mrr


async def test_context_quality_floor(report: EvalReport) -> None:
    assert report.context_hit_rate >= 0.90, report.context_hit_rate
