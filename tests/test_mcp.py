"""The MCP server through a real in-memory client, in both protocol eras: tools, resources, prompts, errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import TextContent, TextResourceContents

from sage_server.assistant import build_server
from sage_server.budget import MAX_TOKENS_CEILING
from sage_server.config import Settings
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from sage_server.text import estimate_tokens
from tests.conftest import BACKENDS, database_for
from tests.mcp_support import error_text, huge_document, payload, settings_for, text_of, write_knowledge

pytestmark = pytest.mark.anyio

TOOLS = {
    "sage_get_knowledge",
    "sage_search",
    "sage_get_context",
    "sage_get_document",
    "sage_list",
    "sage_info",
    "sage_save_knowledge",
    "sage_delete_knowledge",
    "sage_history",
    "sage_restore_revision",
}
WRITES = {"sage_save_knowledge", "sage_delete_knowledge", "sage_restore_revision"}
# mode="auto" drives the in-process server the 2026-07-28 way (no handshake); "legacy" uses 2025-11-25 initialize.
ERAS = {"auto": "2026-07-28", "legacy": "2025-11-25"}


@pytest.fixture(params=BACKENDS)
async def mcp_settings(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Settings]:
    """Every test on the `kb` fixture runs on SQLite and on PostgreSQL."""
    async with database_for(request.param) as database:
        yield settings_for(tmp_path, write_knowledge(tmp_path / "kb"), **database)


@pytest.fixture
async def kb(mcp_settings: Settings) -> AsyncIterator[KnowledgeService]:
    async with open_service(mcp_settings) as service:
        yield service


@pytest.fixture(params=sorted(ERAS))
async def client(request: pytest.FixtureRequest, kb: KnowledgeService) -> AsyncIterator[Client]:
    async with Client(build_server(kb), raise_exceptions=True, mode=request.param) as connected:
        assert connected.protocol_version == ERAS[request.param]
        yield connected


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    return payload(await client.call_tool(tool, arguments))


# -- tools -------------------------------------------------------------------------------------------------


async def test_every_tool_is_listed_with_hints_and_each_argument_described_once(client: Client) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for name, tool in tools.items():
        assert tool.annotations is not None and tool.annotations.open_world_hint is False
        assert tool.annotations.read_only_hint is (name not in WRITES)
        # The spec gives the destructive and idempotent hints meaning for tools that write only.
        assert (tool.annotations.idempotent_hint is None) is (name not in WRITES)
        assert tool.output_schema is None  # structured content all the same (see payload())
        assert tool.description and tool.title and "Args:" not in tool.description
        properties = tool.input_schema.get("properties", {})
        if "max_tokens" in properties:
            assert properties["max_tokens"]["maximum"] == MAX_TOKENS_CEILING
            assert properties["max_tokens"]["default"] == 4000
        for argument, schema in properties.items():
            assert schema.get("description"), f"{name} does not describe {argument}"
            assert "title" not in schema and {"type": "null"} not in schema.get("anyOf", []), (name, argument)
    assert tools["sage_delete_knowledge"].annotations is not None
    assert tools["sage_delete_knowledge"].annotations.destructive_hint is True
    assert tools["sage_save_knowledge"].annotations is not None
    assert tools["sage_save_knowledge"].annotations.destructive_hint is False
    assert tools["sage_save_knowledge"].input_schema["required"] == ["title", "body"]  # the id may be derived


async def test_the_tool_list_is_small(client: Client) -> None:
    listed = await client.session.list_tools()
    wire = json.dumps(listed.model_dump(mode="json", by_alias=True, exclude_none=True), separators=(",", ":"))
    assert estimate_tokens(wire) < 2500


async def test_descriptions_are_filled_from_the_settings(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, write_knowledge(tmp_path / "kb", {}), layers=["core", "playbooks"], default_layer="playbooks"
    )
    async with open_service(settings) as service, Client(build_server(service)) as connected:
        tools = {tool.name: tool for tool in (await connected.list_tools()).tools}
        templates = (await connected.list_resource_templates()).resource_templates
    save = tools["sage_save_knowledge"].input_schema["properties"]["layer"]["description"]
    assert save == "One of core, playbooks; default playbooks"
    assert "core, playbooks" in tools["sage_search"].input_schema["properties"]["layers"]["description"]
    assert "by default core" in (tools["sage_get_knowledge"].description or "")
    assert any("core, playbooks" in (template.description or "") for template in templates)


async def test_search_returns_ranked_hits_with_snippets_and_token_counts(client: Client) -> None:
    result = await call(client, "sage_search", query="retry backoff")
    hit = result["hits"][0]
    assert hit["id"] == "timeout-resilience"
    assert {"title", "layer", "score", "snippet", "tokens", "revision"} <= set(hit)
    assert "**" in hit["snippet"] and hit["tokens"] > 0
    assert result["truncated"] is False

    filtered = await call(client, "sage_search", query="review security", layers=["practices"], tags=["security"])
    assert [h["id"] for h in filtered["hits"]] == ["handling-secrets"]


async def test_search_pages_with_a_cursor(client: Client) -> None:
    first = await call(client, "sage_search", query="review testing security retry", limit=2)
    assert len(first["hits"]) == 2 and first["next_cursor"]
    rest = await call(
        client, "sage_search", query="review testing security retry", limit=2, cursor=first["next_cursor"]
    )
    everything = await call(client, "sage_search", query="review testing security retry", limit=4)
    assert [h["id"] for h in first["hits"] + rest["hits"]] == [h["id"] for h in everything["hits"]]


async def test_get_knowledge_reads_the_core_layer_by_default_or_what_a_task_needs(client: Client) -> None:
    core = await call(client, "sage_get_knowledge")
    assert core["layer"] == "core" and core["total"] == 1
    assert core["documents"][0]["id"] == "verify-with-evidence"
    assert "quote their output" in core["documents"][0]["text"]

    relevant = await call(client, "sage_get_knowledge", layer="practices", task="api key leaked")
    assert [d["id"] for d in relevant["documents"]] == ["handling-secrets"]


async def test_get_context_packs_cited_sections_for_a_task(client: Client) -> None:
    result = await call(client, "sage_get_context", task="add retries with backoff to the HTTP client")
    assert "sage:timeout-resilience" in result["text"]
    assert "Verify With Evidence" in result["text"]  # the core principles come along
    assert {s["id"] for s in result["sources"]} >= {"timeout-resilience"}
    assert result["tokens_used"] <= result["max_tokens"] == 4000


async def test_get_document_whole_or_by_section_with_its_revision(client: Client) -> None:
    whole = await call(client, "sage_get_document", id="timeout-resilience")
    assert whole["revision"] == 1 and whole["next_offset"] is None and whole["truncated"] is False
    assert whole["sections"] == ["Timeout and Resilience Strategy", "Retries", "Circuit breakers"]

    section = await call(client, "sage_get_document", id="timeout-resilience", section="## retries")
    assert section["section"] == "Retries"
    assert section["text"].startswith("## Retries") and "Circuit" not in section["text"]

    missing = error_text(await client.call_tool("sage_get_document", {"id": "timeout-resilience", "section": "Retry"}))
    assert "no section 'Retry'" in missing and "'Retries'" in missing


async def test_list_browses_by_layer_and_tag_a_page_at_a_time(client: Client) -> None:
    practices = await call(client, "sage_list", layer="practices", limit=1)
    assert practices["total"] == 2 and len(practices["items"]) == 1 and practices["next_cursor"]
    second = await call(client, "sage_list", layer="practices", limit=1, cursor=practices["next_cursor"])
    assert {practices["items"][0]["id"], second["items"][0]["id"]} == {"code-review-guidelines", "handling-secrets"}
    assert second["next_cursor"] is None

    tagged = await call(client, "sage_list", tags=["testing"])
    assert [i["id"] for i in tagged["items"]] == ["verify-with-evidence", "code-review-guidelines"]


async def test_info_counts_documents_by_layer(client: Client) -> None:
    info = await call(client, "sage_info")
    assert info["documents"] == 4 and info["layers"]["practices"] == 2 and info["layers"]["scenarios"] == 0
    assert info["generation"] >= 1 and info["uptime_seconds"] >= 0 and info["version"]


async def test_save_is_searchable_at_once_and_expected_revision_turns_a_race_into_a_conflict(client: Client) -> None:
    doc = {"id": "retry-budgets", "title": "Retry budgets", "body": "# Retry budgets\n\nCap zanzibar retries.\n"}
    created = await call(client, "sage_save_knowledge", **doc, tags=["resilience"], expected_revision=0)
    assert created["revision"] == 1 and created["layer"] == "practices" and created["deleted"] is False
    found = await call(client, "sage_search", query="zanzibar")
    assert [h["id"] for h in found["hits"]] == ["retry-budgets"]

    same = await call(client, "sage_save_knowledge", **doc, tags=["resilience"])
    assert same["revision"] == 1  # identical content stores nothing

    updated = await call(client, "sage_save_knowledge", **{**doc, "body": "Cap retries at 10%.\n"}, expected_revision=1)
    assert updated["revision"] == 2
    stale = error_text(await client.call_tool("sage_save_knowledge", {**doc, "expected_revision": 1}))
    assert stale.startswith("Error executing tool sage_save_knowledge: conflict:") and "revision 2" in stale
    assert (await call(client, "sage_get_document", id="retry-budgets"))["text"] == "Cap retries at 10%.\n"


async def test_delete_history_and_restore(client: Client) -> None:
    deleted = await call(client, "sage_delete_knowledge", id="handling-secrets")
    assert deleted["deleted"] is True and deleted["revision"] == 2
    gone = error_text(await client.call_tool("sage_get_document", {"id": "handling-secrets"}))
    assert "deleted" in gone
    assert (await call(client, "sage_search", query="api key"))["hits"] == []

    history = await call(client, "sage_history", id="handling-secrets")
    assert history["deleted"] is True
    assert [(r["revision"], r["change"]) for r in history["revisions"]] == [(2, "delete"), (1, "create")]

    restored = await call(client, "sage_restore_revision", id="handling-secrets", revision=1)
    assert restored["deleted"] is False and restored["revision"] == 3
    assert [h["id"] for h in (await call(client, "sage_search", query="api key"))["hits"]] == ["handling-secrets"]


# -- errors ------------------------------------------------------------------------------------------------


async def test_unknown_id_is_a_tool_error_naming_the_closest_ids(client: Client) -> None:
    for tool, extra in [("sage_get_document", {}), ("sage_history", {}), ("sage_restore_revision", {"revision": 1})]:
        message = error_text(await client.call_tool(tool, {"id": "timeout-resilianse", **extra}))
        assert "not_found: no document with id 'timeout-resilianse'" in message
        assert "timeout-resilience" in message


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        ("sage_search", {"query": "retry", "limit": 500}, "limit"),
        ("sage_search", {"query": "retry", "max_tokens": 25_000}, "max_tokens"),
        ("sage_search", {"query": "retry", "layers": ["nonsense"]}, "invalid_input: unknown layer 'nonsense'"),
        ("sage_search", {"query": "retry", "cursor": "garbage"}, "invalid_input: cursor"),
        ("sage_get_document", {"id": "timeout-resilience", "offset": 10**6}, "invalid_input: offset"),
        ("sage_get_knowledge", {"layer": "nonsense"}, "unknown layer"),
        (
            "sage_save_knowledge",
            {"id": "no spaces!", "title": "T", "body": "x"},
            "invalid_input: id: invalid id 'no spaces!'",
        ),
        ("sage_save_knowledge", {"id": "x", "title": "T", "body": "x", "layer": "nope"}, "unknown layer"),
        ("sage_get_context", {}, "task"),
    ],
)
async def test_invalid_arguments_come_back_as_a_short_message(
    client: Client, tool: str, arguments: dict[str, Any], expected: str
) -> None:
    message = error_text(await client.call_tool(tool, arguments))
    assert message.startswith(f"Error executing tool {tool}: ")
    assert expected in message


async def test_a_server_fault_is_one_failed_call_not_a_lost_session(
    client: Client, kb: KnowledgeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(kb, "info", broken)
    message = error_text(await client.call_tool("sage_info", {}))
    assert message == "Error executing tool sage_info" and "secret" not in message
    labels = {"tool": "sage_info", "outcome": "internal_error"}
    assert kb.metrics.registry.get_sample_value("sage_mcp_tool_calls_total", labels) == 1
    with pytest.raises(MCPError):
        await client.read_resource("knowledge://index")
    # The same session goes on serving.
    assert (await call(client, "sage_search", query="retry"))["hits"]


async def test_tool_calls_are_counted_by_outcome_with_their_size(client: Client, kb: KnowledgeService) -> None:
    await client.call_tool("sage_search", {"query": "retry"})
    await client.call_tool("sage_get_document", {"id": "nope"})
    assert (await call(client, "sage_list", max_tokens=200))["truncated"] is True

    def sample(name: str, **labels: str) -> float | None:
        return kb.metrics.registry.get_sample_value(name, labels)

    assert sample("sage_mcp_tool_calls_total", tool="sage_search", outcome="ok") == 1
    assert sample("sage_mcp_tool_calls_total", tool="sage_get_document", outcome="not_found") == 1
    assert sample("sage_mcp_result_tokens_count", tool="sage_search") == 1
    assert sample("sage_mcp_truncations_total", tool="sage_list") == 1


# -- result size: the token contract -----------------------------------------------------------------------


@pytest.fixture
async def huge_client(tmp_path: Path) -> AsyncIterator[tuple[Client, KnowledgeService]]:
    docs = {f"practices/huge-{n}.md": huge_document(f"huge-{n}", sections=24, paragraphs=8) for n in range(3)}
    settings = settings_for(tmp_path, write_knowledge(tmp_path / "huge", docs))
    async with open_service(settings) as service:
        assert service.last_import is not None and service.last_import.created == 3
        async with Client(build_server(service), raise_exceptions=True) as connected:
            yield connected, service


BOUNDED_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("sage_get_knowledge", {"layer": "practices"}),
    ("sage_get_knowledge", {"layer": "practices", "task": "retry storm"}),
    ("sage_search", {"query": "retry storm timeout backoff", "limit": 100}),
    ("sage_get_context", {"task": "handle a retry storm with timeouts"}),
    ("sage_get_document", {"id": "huge-1"}),
    ("sage_get_document", {"id": "huge-1", "section": "Part 7"}),
    ("sage_list", {"limit": 100}),
    ("sage_history", {"id": "huge-0"}),
]


@pytest.mark.parametrize("max_tokens", [200, 1000, 4000, 20_000])
async def test_no_tool_answer_exceeds_max_tokens_on_very_large_documents(
    huge_client: tuple[Client, KnowledgeService], max_tokens: int
) -> None:
    client, _ = huge_client
    for tool, arguments in BOUNDED_CALLS:
        result = await client.call_tool(tool, {**arguments, "max_tokens": max_tokens})
        data = payload(result)
        assert estimate_tokens(text_of(result)) <= max_tokens, (tool, arguments)
        if data["truncated"]:
            assert data["hint"], (tool, arguments)


async def test_the_default_budget_is_4000_tokens(huge_client: tuple[Client, KnowledgeService]) -> None:
    client, _ = huge_client
    result = await client.call_tool("sage_get_document", {"id": "huge-2"})
    assert 3500 < estimate_tokens(text_of(result)) <= 4000
    assert payload(result)["truncated"] is True


async def test_a_long_document_reads_whole_by_following_next_offset(
    huge_client: tuple[Client, KnowledgeService],
) -> None:
    client, kb = huge_client
    body = (await kb.get("huge-0")).body
    parts: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = await call(client, "sage_get_document", id="huge-0", offset=offset, max_tokens=8000)
        assert page["offset"] == offset
        parts.append(page["text"])
        if page["truncated"]:
            assert f"offset={page['next_offset']}" in page["hint"]
            assert page["text"].endswith("\n")  # cut at a line or paragraph break
        offset = page["next_offset"]
    assert "".join(parts) == body and len(parts) > 3


async def test_a_cut_search_page_continues_after_the_last_hit_shown(
    huge_client: tuple[Client, KnowledgeService],
) -> None:
    client, kb = huge_client
    for n in range(12):
        await kb.save(DocumentIn(id=f"storm-{n:02}", title=f"Storm {n}", layer="scenarios", body="retry storm " * 40))
    query = {"query": "retry storm", "layers": ["scenarios"], "limit": 12}
    everything = [h["id"] for h in (await call(client, "sage_search", **query, max_tokens=20_000))["hits"]]
    first = await call(client, "sage_search", **query, max_tokens=300)
    assert first["truncated"] is True and "next_cursor" in first["hint"]
    rest = await call(client, "sage_search", **query, cursor=first["next_cursor"], max_tokens=20_000)
    assert [h["id"] for h in first["hits"] + rest["hits"]] == everything


async def test_every_budget_from_the_minimum_up_gets_an_answer_that_fits(
    huge_client: tuple[Client, KnowledgeService],
) -> None:
    client, kb = huge_client
    for n in range(30):
        await kb.save(DocumentIn(id=f"gust-{n:02}", title=f"Gust {n}", layer="scenarios", body="retry gust " * 30))
    calls: list[tuple[str, dict[str, Any]]] = [
        *BOUNDED_CALLS,
        ("sage_search", {"query": "retry gust", "layers": ["scenarios"], "limit": 30}),
        ("sage_list", {"layer": "scenarios", "limit": 30}),
    ]
    for max_tokens in range(200, 800, 37):
        for tool, arguments in calls:
            result = await client.call_tool(tool, {**arguments, "max_tokens": max_tokens})
            payload(result)
            assert estimate_tokens(text_of(result)) <= max_tokens, (tool, arguments, max_tokens)


async def test_resources_stay_under_the_ceiling_and_say_where_to_read_on(
    huge_client: tuple[Client, KnowledgeService],
) -> None:
    client, _ = huge_client
    for uri in ("knowledge://practices", "knowledge://practices/huge-1", "knowledge://index"):
        content = (await client.read_resource(uri)).contents[0]
        assert isinstance(content, TextResourceContents)
        assert estimate_tokens(content.text) <= MAX_TOKENS_CEILING
    assert isinstance(content, TextResourceContents)
    document = (await client.read_resource("knowledge://practices/huge-1")).contents[0]
    assert isinstance(document, TextResourceContents) and "sage_get_document" in document.text


# -- resources and prompts ---------------------------------------------------------------------------------


async def test_resources_are_markdown_by_index_layer_and_id(client: Client) -> None:
    listed = (await client.list_resources()).resources
    assert [str(r.uri) for r in listed][:3] == ["knowledge://index", "knowledge://core", "knowledge://guidelines"]
    documents = {str(r.uri): r for r in listed if r.uri.count("/") == 3}
    assert list(documents) == [  # every document, by layer and id
        "knowledge://core/verify-with-evidence",
        "knowledge://frameworks/timeout-resilience",
        "knowledge://practices/code-review-guidelines",
        "knowledge://practices/handling-secrets",
    ]
    secrets = documents["knowledge://practices/handling-secrets"]
    assert (secrets.name, secrets.title, secrets.description) == (
        "handling-secrets",
        "Handling Secrets",
        "Keep credentials out of code and logs.",
    )
    templates = (await client.list_resource_templates()).resource_templates
    assert {t.uri_template for t in templates} == {"knowledge://{layer}", "knowledge://{layer}/{id}"}
    assert {r.mime_type for r in listed} | {t.mime_type for t in templates} == {"text/markdown"}

    index = (await client.read_resource("knowledge://index")).contents[0]
    assert isinstance(index, TextResourceContents) and index.mime_type == "text/markdown"
    assert "## practices (2)" in index.text and "`handling-secrets` Handling Secrets" in index.text

    layer = (await client.read_resource("knowledge://frameworks")).contents[0]
    assert isinstance(layer, TextResourceContents) and "_sage:timeout-resilience, revision 1_" in layer.text

    document = (await client.read_resource("knowledge://frameworks/timeout-resilience")).contents[0]
    assert isinstance(document, TextResourceContents) and document.text.startswith("# Timeout and Resilience")


@pytest.mark.parametrize(
    "uri", ["knowledge://practices/timeout-resilience", "knowledge://frameworks/nope", "knowledge://nonsense"]
)
async def test_an_unknown_resource_is_an_error_that_says_why(client: Client, uri: str) -> None:
    with pytest.raises(MCPError) as caught:
        await client.read_resource(uri)
    assert "frameworks" in str(caught.value) or "not_found" in str(caught.value) or "layer" in str(caught.value)


PROMPTS = {
    "code_review": ({"change": "adds retries to the HTTP client"}, "sage:timeout-resilience"),
    "debugging": ({"problem": "requests hang forever without a timeout"}, "sage:timeout-resilience"),
    "design": ({"goal": "a circuit breaker for the payment client"}, "sage:timeout-resilience"),
    "documentation": ({"subject": "how we review pull requests"}, "sage:code-review-guidelines"),
    "onboarding": ({"area": "code review"}, "sage:code-review-guidelines"),
}


async def test_prompts_embed_the_relevant_knowledge(client: Client) -> None:
    listed = {p.name: p for p in (await client.list_prompts()).prompts}
    assert set(listed) == set(PROMPTS)
    for name, (arguments, citation) in PROMPTS.items():
        prompt = await client.get_prompt(name, arguments)
        assert len(prompt.messages) == 1 and prompt.messages[0].role == "user"
        content = prompt.messages[0].content
        assert isinstance(content, TextContent)
        assert citation in content.text, name
        assert "Verify With Evidence" in content.text  # the core principles
        assert all(value in content.text for value in arguments.values())
