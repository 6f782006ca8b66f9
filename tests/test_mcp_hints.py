"""Cache hints: every 2026-07-28 result that takes `ttlMs`/`cacheScope` carries the policy's, `private` wherever the
answer may depend on who asks; a client that honours them asks again only when they run out or a change is heard."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.caching import CacheHint, validate_cache_hints
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.subscriptions import ResourceUpdated
from pydantic import SecretStr

from sage_server.app import create_mcp_app
from sage_server.assistant import build_server
from sage_server.assistant.hints import CacheHints, HintPolicy
from sage_server.config import Settings
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from tests.mcp_support import serving, settings_for, subprocess_env, write_knowledge

pytestmark = pytest.mark.anyio

SECRETS = "knowledge://practices/handling-secrets"


def settings_with(tmp_path: Path, **overrides: Any) -> Settings:
    return settings_for(tmp_path, write_knowledge(tmp_path / "kb"), **overrides)


@asynccontextmanager
async def service(tmp_path: Path, **overrides: Any) -> AsyncIterator[KnowledgeService]:
    async with open_service(settings_with(tmp_path, **overrides)) as kb:
        yield kb


async def hints_of(client: Client) -> dict[str, tuple[int, str]]:
    """(ttlMs, cacheScope) of every kind of result that takes them, straight from the session (no client cache)."""
    session = client.session
    results = {
        "server/discover": await session.discover(),
        "tools/list": await session.list_tools(),
        "prompts/list": await session.list_prompts(),
        "resources/templates/list": await session.list_resource_templates(),
        "resources/list": await session.list_resources(),
        "resources/read": await session.read_resource(SECRETS),
    }
    return {method: (result.ttl_ms, result.cache_scope) for method, result in results.items()}


async def test_every_cacheable_result_carries_the_stated_policy(tmp_path: Path) -> None:
    async with (
        service(tmp_path, mcp_cache_ttl_seconds=30, mcp_catalog_ttl_seconds=900) as kb,
        Client(build_server(kb)) as client,
    ):
        assert await hints_of(client) == {
            "server/discover": (900_000, "public"),
            "tools/list": (900_000, "public"),
            "prompts/list": (900_000, "public"),
            "resources/templates/list": (900_000, "public"),
            "resources/list": (30_000, "public"),
            "resources/read": (30_000, "public"),
        }


async def test_no_hints_reach_a_2025_client(tmp_path: Path) -> None:
    # The fields belong to 2026-07-28; an older client gets the results it knows, read here off the wire.
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "old", "version": "1"}},
    }
    accept = {"Accept": "application/json, text/event-stream"}
    async with serving(create_mcp_app(settings_with(tmp_path))) as url, httpx2.AsyncClient(base_url=url) as http:
        with anyio.fail_after(30):
            opened = await http.post("/mcp", json=initialize, headers=accept)
            session = {
                **accept,
                "mcp-session-id": opened.headers["mcp-session-id"],
                "mcp-protocol-version": "2025-11-25",
            }
            await http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
            listed = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=session)
    assert listed.status_code == 200 and "sage_search" in listed.text
    assert "ttlMs" not in listed.text and "cacheScope" not in listed.text


KEY = "s3cret-key-for-tests"


@pytest.mark.parametrize(
    ("configured", "presented", "allow_anonymous", "scope"),
    [
        (None, None, False, "public"),  # no credential exists: every caller is the same anonymous one
        (KEY, KEY, False, "private"),  # what a key may see depends on its scopes
        (KEY, None, True, "private"),  # an anonymous reader beside keys sees less than a key
    ],
    ids=["no-credential", "key", "anonymous-reader"],
)
async def test_answers_are_private_wherever_they_may_depend_on_who_asks(
    tmp_path: Path, configured: str | None, presented: str | None, allow_anonymous: bool, scope: str
) -> None:
    settings = settings_with(
        tmp_path, api_key=SecretStr(configured) if configured else None, allow_anonymous=allow_anonymous
    )
    headers = {"Authorization": f"Bearer {presented}"} if presented else {}
    async with open_service(settings) as kb, serving(create_mcp_app(settings, kb)) as url:
        with anyio.fail_after(30):
            http = httpx2.AsyncClient(headers=headers)
            async with http, Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
                hints = await hints_of(client)
    assert {scope_of for _, scope_of in hints.values()} == {scope}


def test_the_sdk_still_takes_one_fixed_hint_per_method() -> None:
    # SAGE sets the hints per request in a middleware (hints.CacheHints) because MCP SDK 2.3's `cache_hints` takes a
    # fixed CacheHint per method, so the scope could not follow the caller. When this fails, the SDK takes a hint
    # computed per request: use that instead.
    with pytest.raises(TypeError):
        validate_cache_hints({"tools/list": lambda ctx: CacheHint(ttl_ms=1000, scope="public")})


async def test_an_input_required_round_is_never_hinted() -> None:
    hints = CacheHints(HintPolicy(knowledge_ms=60_000, catalog_ms=60_000))
    interim = {"resultType": "input_required", "inputRequests": {}, "requestState": "x"}

    async def answer(ctx: ServerRequestContext[Any, Any]) -> HandlerResult:
        return dict(interim)

    ctx = ServerRequestContext[Any, Any](
        session=None,  # type: ignore[arg-type]  # not used by the middleware
        lifespan_context={},
        protocol_version="2026-07-28",
        method="resources/read",
    )
    assert await hints(ctx, answer) == interim


async def test_a_client_that_honours_the_hints_asks_again_only_after_a_change(tmp_path: Path) -> None:
    async with service(tmp_path) as kb:
        server = build_server(kb)
        reads: list[str] = []

        async def count(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
            if ctx.method == "resources/read":
                reads.append(str((ctx.params or {}).get("uri")))
            return await call_next(ctx)

        server.middleware.append(count)
        async with Client(server) as client, client.listen(resource_subscriptions=[SECRETS]) as subscription:
            for _ in range(5):
                assert "Never commit" in text(await client.read_resource(SECRETS))
            assert reads == [SECRETS]  # the other four came from the client's cache

            await kb.save(DocumentIn(id="handling-secrets", title="Handling Secrets", layer="practices", body="New.\n"))
            with anyio.fail_after(10):
                assert await anext(aiter(subscription)) == ResourceUpdated(uri=SECRETS)
            assert text(await client.read_resource(SECRETS)) == "New.\n"  # the change evicted the cached copy
            assert reads == [SECRETS, SECRETS]


def text(result: Any) -> str:
    return str(result.contents[0].text)


@pytest.mark.e2e
async def test_over_stdio_the_hints_follow_the_settings(tmp_path: Path) -> None:
    settings = settings_with(tmp_path)
    command = [sys.executable, "-m", "sage_server", "--db", str(settings.db_path), "mcp"]
    env = {**subprocess_env(settings, tmp_path), "SAGE_MCP_CACHE_TTL_SECONDS": "45"}
    params = StdioServerParameters(command=command[0], args=command[1:], env=env, cwd=tmp_path)
    with (tmp_path / "stderr.log").open("w") as stderr, anyio.fail_after(60):
        async with Client(stdio_client(params, errlog=stderr)) as client:
            hints = await hints_of(client)
    assert hints["resources/read"] == (45_000, "public") and hints["tools/list"] == (300_000, "public")
