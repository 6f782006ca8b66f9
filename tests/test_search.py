"""Search: any text is a valid query; ranking, filters, pages, CJK, accents and typos behave."""

from __future__ import annotations

import pytest

from sage_server.errors import InvalidInput
from sage_server.models import DocumentIn
from sage_server.search import parse_query
from sage_server.service import KnowledgeService

pytestmark = pytest.mark.anyio

HOSTILE = [
    '"',
    '""',
    '"unbalanced',
    "(",
    ")",
    "((retry",
    "retry)",
    "*",
    "**",
    "-",
    "-retry",
    "retry -backoff",
    "NEAR",
    "NEAR(retry backoff)",
    "retry NEAR/3 backoff",
    "AND",
    "OR OR OR",
    "NOT retry",
    "title:retry",
    "{title}: retry",
    "retry^2",
    "'; DROP TABLE documents; --",
    "\\",
    "%",
    "_",
    "\x00",
    "💥",
    "retry" * 2000,
    "a " * 5000,
    'col : "x"',
    "^",
    "+retry",
    "retry*",
    "re*",
    "“smart quotes”",
]


@pytest.mark.parametrize("query", HOSTILE)
async def test_any_text_is_a_valid_query(service: KnowledgeService, query: str) -> None:
    result = await service.search(query)
    assert isinstance(result.hits, list)


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
async def test_empty_query_is_a_validation_error(service: KnowledgeService, query: str) -> None:
    with pytest.raises(InvalidInput, match="query must not be empty"):
        await service.search(query)


async def test_title_and_triggers_outrank_body(service: KnowledgeService) -> None:
    await service.save(
        DocumentIn(
            id="mentions",
            title="Unrelated",
            layer="practices",
            body="We once talked about a circuit breaker in passing.",
        )
    )
    hits = (await service.search("circuit breaker")).hits
    assert [h.id for h in hits][:2] == ["timeout-resilience", "mentions"]
    assert hits[0].score > hits[1].score
    assert "**" in hits[0].snippet


async def test_operators_are_words_not_syntax(service: KnowledgeService) -> None:
    assert [h.id for h in (await service.search("retry AND NOT backoff")).hits] == ["timeout-resilience"]
    assert [h.id for h in (await service.search("resili*")).hits] == ["timeout-resilience"]
    assert [h.id for h in (await service.search('"exponential backoff"')).hits] == ["timeout-resilience"]
    assert (await service.search('"backoff exponential"')).hits == []


async def test_filters_by_layer_and_tag(service: KnowledgeService) -> None:
    assert [h.id for h in (await service.search("key", layers=["practices"])).hits] == ["handling-secrets"]
    assert (await service.search("key", layers=["core"])).hits == []
    assert [h.id for h in (await service.search("report", tags=["testing"])).hits] == ["honesty"]
    with pytest.raises(InvalidInput, match="unknown layer"):
        await service.search("key", layers=["nope"])


@pytest.mark.parametrize("query", ["密钥", "轮换密钥", "密钥泄露后必须", "访问日志"])
async def test_cjk_is_findable_by_two_or_more_characters(service: KnowledgeService, query: str) -> None:
    hits = (await service.search(query)).hits
    assert hits and hits[0].id == "handling-secrets"
    assert f"**{query}**" in hits[0].snippet


async def test_accents_and_case_do_not_matter(service: KnowledgeService) -> None:
    await service.save(DocumentIn(id="cafe", title="Café Déjà Vu", layer="practices", body="Naïve résumé parsing."))
    for query in ("cafe", "CAFÉ", "deja vu", "NAIVE resume"):
        assert [h.id for h in (await service.search(query)).hits] == ["cafe"], query


async def test_typos_are_corrected_and_said(service: KnowledgeService) -> None:
    result = await service.search("circut breakr")
    assert result.hits and result.hits[0].id == "timeout-resilience"
    assert result.corrected_query is not None and "circuit" in result.corrected_query


async def test_pages_do_not_overlap_and_cursors_belong_to_their_query(service: KnowledgeService) -> None:
    for n in range(12):
        await service.save(
            DocumentIn(id=f"note-{n:02}", title=f"Note {n}", layer="practices", body=f"pagination sample {n}")
        )
    first = await service.search("pagination", limit=5)
    second = await service.search("pagination", limit=5, cursor=first.next_cursor)
    third = await service.search("pagination", limit=5, cursor=second.next_cursor)
    pages = [h.id for page in (first, second, third) for h in page.hits]
    assert len(pages) == len(set(pages)) == 12 and third.next_cursor is None
    with pytest.raises(InvalidInput, match="different query"):
        await service.search("other", cursor=first.next_cursor)
    with pytest.raises(InvalidInput, match="not one this server issued"):
        await service.search("pagination", cursor="garbage!")


def test_parse_query_quotes_everything() -> None:
    parsed = parse_query('retry "circuit breaker" NEAR(x) back* 中文搜索 the')
    assert parsed.fts() == (
        '"retry" OR "circuit breaker" OR "near" OR "back"* OR cjk : ("中文 文搜 搜索" OR "中文" OR "文搜" OR "搜索")'
    )
    assert parse_query("the and of").fts() == '"the" OR "and" OR "of"'
    assert parse_query("?!").terms == []
