"""Search: any text is a valid query; ranking, filters, pages, CJK, accents and typos behave."""

from __future__ import annotations

import base64
import json

import pytest

from sage_server import proximity, search, spelling
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
    assert first.next_cursor is not None
    forged = json.loads(base64.urlsafe_b64decode(first.next_cursor + "=" * (-len(first.next_cursor) % 4)))
    for offset in (-1, 10**30):
        cursor = base64.urlsafe_b64encode(json.dumps({**forged, "o": offset}).encode()).decode()
        with pytest.raises(InvalidInput, match="offset must be between"):
            await service.search("pagination", cursor=cursor)


def test_parse_query_quotes_everything() -> None:
    parsed = parse_query('retry "circuit breaker" NEAR(x) back* 中文搜索 the')
    assert parsed.fts() == (
        '"retry" OR "circuit breaker" OR "near" OR "back"* OR cjk : ("中文 文搜 搜索" OR "中文" OR "文搜" OR "搜索")'
    )
    assert parse_query("the and of").fts() == '"the" OR "and" OR "of"'
    assert parse_query("?!").terms == []


async def save(service: KnowledgeService, doc_id: str, title: str, body: str, **extra: object) -> None:
    await service.save(DocumentIn(id=doc_id, title=title, layer="practices", body=body, **extra))  # type: ignore[arg-type]


async def test_words_found_together_in_the_query_order_rank_first(service: KnowledgeService) -> None:
    # Both hold the three words; only one says them in one sentence, in the order asked.
    await save(service, "scattered", "Notes", "The socket closes. " + "Filler words here. " * 40 + "A peer may reset.")
    await save(
        service, "together", "Notes", "Filler words here. " * 20 + "The peer may reset the socket when it closes."
    )
    hits = (await service.search("peer reset socket")).hits
    assert [h.id for h in hits][:2] == ["together", "scattered"]


async def test_typos_are_corrected_even_in_the_first_letter(service: KnowledgeService) -> None:
    for typo in ("xircuit breaker", "ircuit breaker", "circiut breaker"):
        result = await service.search(typo)
        assert result.hits and result.hits[0].id == "timeout-resilience", typo
        assert result.corrected_query is not None and "circuit" in result.corrected_query, typo


async def test_a_word_cut_short_is_read_as_the_start_of_longer_words(service: KnowledgeService) -> None:
    result = await service.search("timeout strat")  # no document holds "strat" as a word
    assert result.hits[0].id == "timeout-resilience"
    assert result.corrected_query == "timeout strat*"
    for n in range(search.SHORT_WORD_RATIO):
        await save(service, f"processes-{n}", "Workers", "Each process forks processes; processing queues wait.")
    await save(service, "proc", "Proc", "The proc filesystem.")
    # "proc" is a word, but mostly the start of longer ones: both kinds of document are found, exact ones too.
    explained = await service.search("proc", explain=True)
    assert {h.id for h in explained.hits} >= {"processes-0", "proc"}
    assert explained.terms is not None and explained.terms[0].note == "prefix"


async def test_a_rare_word_near_a_common_one_is_searched_beside_it(service: KnowledgeService) -> None:
    for n in range(spelling.RARE_RATIO):
        await save(service, f"backoff-{n}", f"Backoff {n}", "Exponential backoff between attempts.")
    await save(service, "typo-doc", "Typo", "Exponential bakcoff, as written once.")
    result = await service.search("bakcoff", explain=True)
    assert result.terms is not None and result.terms[0].note == "or"
    assert {h.id for h in result.hits} >= {"typo-doc", "backoff-0"}


async def test_explain_shows_bm25_per_field_and_the_parts_of_the_score(service: KnowledgeService) -> None:
    result = await service.search("circuit breaker", explain=True)
    top = result.hits[0]
    assert top.id == "timeout-resilience" and top.explain is not None
    why = top.explain
    assert why.bm25 > 0 and {"triggers", "summary", "body"} <= set(why.bm25_fields)
    assert set(why.parts) == set(why.weights) == {"bm25", "coverage", "proximity", "meta", "triggers", "sequence"}
    assert top.score == pytest.approx(sum(why.parts[p] * why.weights[p] for p in why.parts), abs=1e-3)
    assert why.matched == ["circuit", "breaker"]
    assert result.terms is not None and [t.searched for t in result.terms] == ["circuit", "breaker"]
    assert all(t.documents >= 1 and t.idf > 0 for t in result.terms)
    assert (await service.search("circuit breaker")).hits[0].explain is None


async def test_scores_say_how_well_a_document_answers(service: KnowledgeService) -> None:
    answer = (await service.search("circuit breaker")).hits[0].score
    stray = (await service.search("circuit sourdough flour oven")).hits[0].score
    assert 0 < stray < answer <= 1


async def test_chinese_sentences_find_documents_holding_their_words_apart(service: KnowledgeService) -> None:
    hits = (await service.search("轮换泄露的密钥")).hits  # no document holds the sentence; one holds its words
    assert hits and hits[0].id == "handling-secrets"


async def test_a_typo_as_close_to_two_words_is_searched_as_both(service: KnowledgeService) -> None:
    await save(service, "flimbat", "Flimbat", "How to tune the flimbat.")
    await save(service, "flambat", "Flambat", "How to tune the flambat.")
    result = await service.search("flembat", explain=True)  # one edit from either
    assert result.terms is not None and result.terms[0].note == "corrected"
    assert result.terms[0].searched in ("(flimbat OR flambat)", "(flambat OR flimbat)")
    assert {h.id for h in result.hits} == {"flimbat", "flambat"}
    # A correction far likelier than the other is searched alone.
    for n in range(20):  # e^CLOSE_FIX times as common
        await save(service, f"flimbat-{n}", f"Flimbat {n}", "The flimbat again.")
    result = await service.search("flembat", explain=True)
    assert result.terms is not None and result.terms[0].searched == "flimbat"


async def test_a_short_stem_correction_does_not_match_every_word_starting_with_it(service: KnowledgeService) -> None:
    await save(service, "zenith", "Zenith", "The zen of zenith: zenithal zenithward views.")
    await save(service, "zen", "Zen", "Zen.")
    result = await service.search("zenk", explain=True)  # "zen" is a word: searched as itself, not as zen*
    assert result.terms is not None and result.terms[0].searched == "zen"


async def test_chinese_pieces_across_a_function_character_count_little(service: KnowledgeService) -> None:
    # '审的', '的时', '候应' straddle words: a document matching mostly through such pieces must not outrank one
    # holding the query's content words.
    await save(service, "straddles", "Changes", "变更评审的时候应该记录。")
    await save(service, "words", "Review", "代码评审：先看意图，再看正确性。")
    hits = (await service.search("代码评审的时候应该先看什么")).hits
    assert [h.id for h in hits][:2] == ["words", "straddles"]


async def test_a_guessed_word_has_more_candidates_re_scored(
    service: KnowledgeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Documents that BM25 prefers (each word often, in a short text) but that hold the words far apart ...
    gap = " filler" * 30
    for n in range(4):
        body = f"zorblax zorblax{gap} quintessa quintessa{gap} vembrook vembrook {n}"
        await save(service, f"scattered-{n}", f"Scattered {n}", body)
    # ... and the one holding them together, once, in a longer text.
    await save(service, "together", "Together", "zorblax quintessa vembrook" + " other words" * 40)
    monkeypatch.setattr(search, "CANDIDATES", 2)
    monkeypatch.setattr(search, "CORRECTED_CANDIDATES", 10)
    # A typo's correction is a guess, so BM25's order says less: more of its candidates are re-scored.
    result = await service.search("zorblax quintessa vembrok")
    assert result.corrected_query is not None and result.hits[0].id == "together"


def test_the_sequence_part_rewards_the_query_order_held_close() -> None:
    near = proximity.in_order([[0], [10], [20]])
    assert near == pytest.approx(1 / (1 + 20 / proximity.SEQUENCE_SCALE))
    assert proximity.in_order([[0, 500], [505], [510]]) > near > proximity.in_order([[0], [100], [300]]) > 0
    assert proximity.in_order([[20], [10], [0]]) == 0.0  # never in the query's order
    assert proximity.in_order([[0], [], [20]]) == 0.0  # a term missing


async def test_the_words_a_typo_may_stand_for_are_looked_up_once_until_the_index_changes(
    service: KnowledgeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []
    original = spelling._neighbour_starts

    def counted(word: str) -> list[str]:
        looked_up.append(word)
        return original(word)

    monkeypatch.setattr(spelling, "_neighbour_starts", counted)
    # Three queries, not one thrice: the result cache would answer a repeated query without searching.
    for query in ("circut breakr", "breakr circut", "circut breakr timeouts"):
        result = await service.search(query)
        assert result.corrected_query is not None and "circuit" in result.corrected_query
    assert looked_up.count("circut") == looked_up.count("breakr") == 1
    # A write changes the index: what was learned of its words is forgotten, and the next search looks again.
    await save(service, "circuits", "Circuits", "A circuit breaker stops calls to a failing dependency.")
    result = await service.search("circut breakr")
    assert result.corrected_query is not None and "circuit" in result.corrected_query
    assert looked_up.count("circut") == looked_up.count("breakr") == 2
