"""Task context: essentials first, cited sections, never over budget, honest about what was left out."""

from __future__ import annotations

import pytest

import sage_server
from sage_server.config import Settings
from sage_server.errors import InvalidInput
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService
from sage_server.text import estimate_tokens

pytestmark = pytest.mark.anyio


async def test_context_cites_matching_sections_after_the_essentials(service: KnowledgeService) -> None:
    result = await service.context("add a retry with backoff around the payment client", max_tokens=1000)
    assert "Honesty About Verification" in result.essentials
    assert result.sections[0].id == "timeout-resilience"
    assert {s.heading for s in result.sections if s.id == "timeout-resilience"} >= {"Retries"}
    assert "_Source: sage:timeout-resilience (revision 1)_" in result.text
    assert result.text.index("Core principles") < result.text.index("Retries")
    keys = [(s.id, s.heading) for s in result.sections]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("budget", [200, 250, 300, 400, 600, 1000, 2500, 8000])
async def test_never_exceeds_the_budget(service: KnowledgeService, budget: int) -> None:
    body = "\n\n".join(f"## Part {n}\n\n" + "backoff retry jitter deadline " * 60 for n in range(12))
    await service.save(DocumentIn(id="big", title="Retry, Backoff, Jitter and Deadlines", layer="practices", body=body))
    result = await service.context("retry backoff jitter deadline", max_tokens=budget)
    assert result.tokens_used == estimate_tokens(result.text) <= budget
    assert result.sections, "something relevant always fits"
    if budget < 2500:
        assert result.omitted, "what did not fit is reported"


async def test_a_single_huge_section_is_truncated_not_dropped(service: KnowledgeService) -> None:
    body = "## Everything\n\n" + "\n\n".join("A paragraph about idempotency keys. " * 10 for _ in range(80))
    await service.save(DocumentIn(id="huge", title="Idempotency", layer="practices", body=body))
    result = await service.context("idempotency keys", max_tokens=600)
    assert result.sections[0].id == "huge" and "truncated to fit" in result.sections[0].text
    assert result.tokens_used <= 600
    assert result.omitted[0].id == "huge"


async def test_no_match_still_gives_essentials(service: KnowledgeService) -> None:
    result = await service.context("quantum chromodynamics", max_tokens=500)
    assert result.sections == [] and "Honesty" in result.text and "No matching knowledge" in result.text


async def test_bad_arguments(service: KnowledgeService) -> None:
    with pytest.raises(InvalidInput, match="task must not be empty"):
        await service.context("  ")
    with pytest.raises(InvalidInput, match="max_tokens must be between 200"):
        await service.context("retry", max_tokens=10)


async def test_sections_that_only_list_links_are_never_packed(service: KnowledgeService) -> None:
    body = (
        "## Retry budgets\n\nA retry budget caps retries at a share of requests.\n\n"
        "## See also\n\n- [Retry storms](sage:retry-storms)\n- [Backoff and retry](https://example.com/retry)\n"
    )
    await service.save(DocumentIn(id="budgets", title="Retry Budgets", layer="practices", body=body))
    result = await service.context("retry budget retry storms backoff", max_tokens=4000)
    assert ("budgets", "Retry budgets") in {(s.id, s.heading) for s in result.sections}
    assert all(s.heading != "See also" for s in result.sections)
    assert "(sage:retry-storms)" not in result.text


async def test_nested_headings_stay_below_the_packers_own(service: KnowledgeService) -> None:
    body = (
        "## Jitter\n\nJitter spreads retries.\n\n### Full jitter\n\nPick a random delay.\n\n"
        "#### Decorrelated\n\nGrow from the last delay.\n\n```bash\n# not a heading\n```\n"
    )
    await service.save(DocumentIn(id="jitter", title="Jitter", layer="practices", body=body))
    result = await service.context("jitter random delay", max_tokens=4000)
    section = next(s for s in result.sections if s.id == "jitter")
    assert "#### Full jitter" in section.text and "##### Decorrelated" in section.text
    assert "# not a heading" in section.text  # code is left alone
    assert "### Jitter" in result.text and "\n### Full jitter" not in result.text


async def test_a_weaker_section_never_takes_the_place_of_one_that_did_not_fit(service: KnowledgeService) -> None:
    big = "## Backoff in depth\n\n" + "Exponential backoff with jitter and a deadline. " * 120
    await service.save(DocumentIn(id="deep", title="Backoff", layer="practices", body=big, triggers=["backoff"]))
    small = "## Aside\n\nBackoff is mentioned here once."
    await service.save(DocumentIn(id="aside", title="Aside", layer="practices", body=small))
    result = await service.context("exponential backoff with jitter and a deadline", max_tokens=1200)
    packed = [s.id for s in result.sections]
    left_out = [o.id for o in result.omitted]
    # The best section was cut to fit; nothing after it sneaks into the budget it left.
    assert packed == ["deep"] and "truncated to fit" in result.sections[0].text
    assert "aside" not in packed and result.tokens_used <= 1200
    assert left_out[0] == "deep"


async def test_the_leading_document_gives_several_sections_a_trailing_one_only_its_best(
    service: KnowledgeService,
) -> None:
    parts = ("Quotas", "Tokens", "Windows", "Headers")
    lead = "".join(f"## {part}\n\nA rate limiter caps bursts with {part.lower()}.\n\n" for part in parts)
    await service.save(
        DocumentIn(
            id="lead", title="Rate Limiter Bursts", layer="practices", body=lead, triggers=["rate limiter bursts"]
        )
    )
    trail = "".join(f"## {part}\n\nBursts of {part.lower()} pass a limiter.\n\n" for part in parts)
    await service.save(DocumentIn(id="trail", title="Rate Limiter Notes", layer="practices", body=trail))
    result = await service.context("rate limiter bursts", max_tokens=4000)
    packed = [s.id for s in result.sections]
    assert packed.count("lead") > 1 and packed.count("trail") == 1, packed
    # A section matching far less than the best one is not packed, however good its document.
    assert all("limiter" in s.text.lower() or "burst" in s.text.lower() for s in result.sections if s.id == "lead")


async def test_a_trailing_document_shows_its_shortest_well_matching_section(service: KnowledgeService) -> None:
    lead = "## Limits\n\nA rate limiter caps bursts.\n\n## Keys\n\nA rate limiter keys bursts by client.\n"
    await service.save(
        DocumentIn(
            id="lead", title="Rate Limiter Bursts", layer="practices", body=lead, triggers=["rate limiter bursts"]
        )
    )
    long_part = (
        "## In depth\n\nA rate limiter and its bursts: each rate limiter meters bursts. "
        + "Tokens refill at a steady pace. " * 60
        + "\n\n"
    )
    short_part = "## In short\n\nA rate limiter smooths bursts.\n"
    await service.save(
        DocumentIn(id="trail", title="Rate Limiter Notes", layer="practices", body=long_part + short_part)
    )
    result = await service.context("rate limiter bursts", max_tokens=4000)
    assert [s.heading for s in result.sections if s.id == "trail"] == ["In short"]


async def test_packing_a_task_again_at_another_budget_reuses_its_ranking_and_equals_a_fresh_packing(
    service: KnowledgeService, settings: Settings
) -> None:
    body = "\n\n".join(f"## Part {n}\n\n" + "backoff retry jitter deadline " * 60 for n in range(12))
    await service.save(DocumentIn(id="big", title="Retry, Backoff, Jitter and Deadlines", layer="practices", body=body))
    task = "retry backoff jitter deadline"
    # The smallest budget first: the best section is cut to fit, which must not cut what is kept for other budgets.
    first = [await service.context(task, max_tokens=budget) for budget in (200, 600, 2500)]
    assert len(service.gathered) == 1, "one ranking for the three budgets"
    assert "truncated to fit" in first[0].sections[0].text and "truncated" not in first[2].sections[0].text
    async with sage_server.open(settings.model_copy(update={"cache_memory": False, "cache_disk": False})) as fresh:
        again = [await fresh.context(task, max_tokens=budget) for budget in (2500, 600, 200)]
    assert [r.text for r in first] == [r.text for r in reversed(again)]
    # A write is a new generation: the task is ranked again, and sees the new revision.
    changed = body.replace("## Part 0", "## Part zero")
    await service.save(
        DocumentIn(id="big", title="Retry, Backoff, Jitter and Deadlines", layer="practices", body=changed)
    )
    assert "_Source: sage:big (revision 2)_" in (await service.context(task, max_tokens=2500)).text
    assert len(service.gathered) == 2
