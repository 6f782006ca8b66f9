"""Task context: essentials first, cited sections, never over budget, honest about what was left out."""

from __future__ import annotations

import pytest

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
    await service.save(DocumentIn(id="big", title="Big Retry Guide", layer="practices", body=body))
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
