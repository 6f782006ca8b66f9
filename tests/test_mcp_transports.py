"""MCP over real transports: a stdio subprocess, uvicorn serving streamable HTTP and SSE, the official Inspector."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from mcp.types import TextContent, TextResourceContents

from sage_server.app import create_mcp_app
from sage_server.assistant import transport_security
from sage_server.config import Settings
from tests.mcp_support import payload, serving, settings_for, subprocess_env, write_knowledge

pytestmark = pytest.mark.anyio

INSPECTOR = ["npx", "-y", "@modelcontextprotocol/inspector@2.12.0", "--cli"]
needs_npx = pytest.mark.skipif(shutil.which("npx") is None, reason="npx (Node.js) is not installed")
ERAS = {"auto": "2026-07-28", "legacy": "2025-11-25"}


@pytest.fixture
def mcp_settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path, write_knowledge(tmp_path / "kb"), host="sage.test")


async def exercise(client: Client) -> None:
    """What every transport must carry: tools, a write seen by search, a resource and a prompt."""
    names = {tool.name for tool in (await client.list_tools()).tools}
    assert {"sage_search", "sage_get_context", "sage_save_knowledge"} <= names
    saved = payload(
        await client.call_tool("sage_save_knowledge", {"id": "wire-note", "title": "Wire", "body": "quokka wire\n"})
    )
    found = payload(await client.call_tool("sage_search", {"query": "quokka"}))
    assert [hit["id"] for hit in found["hits"]] == ["wire-note"] and saved["revision"] >= 1
    missing = await client.call_tool("sage_get_document", {"id": "timeout-resiliense"})
    assert missing.is_error and "timeout-resilience" in str(missing.content)
    document = (await client.read_resource("knowledge://frameworks/timeout-resilience")).contents[0]
    assert isinstance(document, TextResourceContents) and "Retries" in document.text
    prompt = (await client.get_prompt("code_review", {"change": "adds retries"})).messages[0].content
    assert isinstance(prompt, TextContent) and "sage:timeout-resilience" in prompt.text


def sage_mcp(settings: Settings) -> list[str]:
    """The `sage mcp` command line (stdio is its default transport)."""
    return [sys.executable, "-m", "sage_server", "--db", str(settings.db_path), "mcp"]


# -- stdio -------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("mode", sorted(ERAS))
async def test_sage_mcp_serves_stdio_in_both_protocol_eras(mcp_settings: Settings, tmp_path: Path, mode: str) -> None:
    command, *args = sage_mcp(mcp_settings)
    params = StdioServerParameters(command=command, args=args, env=subprocess_env(mcp_settings, tmp_path), cwd=tmp_path)
    errlog = tmp_path / "stderr.log"
    with errlog.open("w") as stderr, anyio.fail_after(60):
        async with Client(stdio_client(params, errlog=stderr), mode=mode) as client:
            assert client.protocol_version == ERAS[mode]
            await exercise(client)
    # stdout was the wire; everything the server logged went to stderr, as JSON lines.
    lines = [line for line in errlog.read_text().splitlines() if line.strip()]
    assert any('"logger": "sage.core"' in line for line in lines)
    assert all(json.loads(line)["level"] for line in lines)


# -- streamable HTTP and SSE -------------------------------------------------------------------------------


@pytest.fixture
async def base_url(mcp_settings: Settings) -> AsyncIterator[str]:
    async with serving(create_mcp_app(mcp_settings)) as url:
        yield url


@pytest.mark.parametrize("mode", sorted(ERAS))
async def test_streamable_http_serves_both_protocol_eras(base_url: str, mode: str) -> None:
    with anyio.fail_after(30):
        async with Client(f"{base_url}/mcp", mode=mode) as client:
            assert client.protocol_version == ERAS[mode]
            await exercise(client)


async def test_sse_serves_older_clients(base_url: str) -> None:
    with anyio.fail_after(30):
        async with Client(sse_client(f"{base_url}/sse"), mode="legacy") as client:
            await exercise(client)


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "1"}},
}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),
        ({"Host": "localhost:8001", "Origin": "http://localhost:3000"}, 200),
        ({"Host": "sage.test:8001", "Origin": "https://sage.test"}, 200),  # the configured host, any port
        ({"Host": "evil.example"}, 421),
        ({"Host": "sage.test.evil.example:80"}, 421),
        ({"Origin": "http://evil.example"}, 403),
    ],
)
async def test_host_and_origin_checks_guard_against_dns_rebinding(
    base_url: str, headers: dict[str, str], status: int
) -> None:
    with anyio.fail_after(30):
        async with httpx2.AsyncClient(base_url=base_url) as http:
            response = await http.post(
                "/mcp", json=INITIALIZE, headers={"Accept": "application/json, text/event-stream", **headers}
            )
            assert response.status_code == status
            sse = await http.get("/sse", headers={"Host": "evil.example"})
            assert sse.status_code == 421


def test_transport_security_allows_localhost_and_the_configured_host(tmp_path: Path) -> None:
    def allowed(host: str) -> list[str]:
        return transport_security(settings_for(tmp_path, tmp_path, host=host)).allowed_hosts

    assert allowed("0.0.0.0") == ["127.0.0.1", "127.0.0.1:*", "localhost", "localhost:*", "[::1]", "[::1]:*"]
    assert allowed("sage.internal")[-2:] == ["sage.internal", "sage.internal:*"]
    assert allowed("fd00::5")[-2:] == ["[fd00::5]", "[fd00::5]:*"]
    extra = transport_security(settings_for(tmp_path, tmp_path, host="0.0.0.0", allowed_hosts=["kb.example"]))
    assert extra.allowed_hosts[-2:] == ["kb.example", "kb.example:*"]
    assert "https://kb.example:*" in extra.allowed_origins


# -- the official MCP Inspector, a client written elsewhere --------------------------------------------------


async def inspector(tmp_path: Path, *arguments: str, exit_code: int = 0) -> dict[str, Any]:
    """Run the Inspector CLI with `arguments`; its JSON answer.

    --tool-arg takes every value after it, so it goes last; a stdio command's own options (-m, -c, --db) pass through.
    """
    env = {**os.environ, "MCP_CATALOG_PATH": str(tmp_path / "inspector-catalog.json")}
    # The first run downloads the Inspector from the npm registry; later runs use npm's cache.
    with anyio.fail_after(300):
        done = await anyio.run_process([*INSPECTOR, *arguments], env=env, check=False)
    assert done.returncode == exit_code, f"inspector exited {done.returncode}: {done.stderr.decode()[-2000:]}"
    # After a tool error's result the Inspector prints an error line too; the result is the first object.
    answer, _ = json.JSONDecoder().raw_decode(done.stdout.decode().lstrip())
    assert isinstance(answer, dict)
    return answer


@pytest.mark.e2e
@needs_npx
async def test_inspector_lists_and_calls_tools_over_http_and_sse(base_url: str, tmp_path: Path) -> None:
    # --strict also reports tool schemas that would not port to other clients, and fails on any error.
    listed = await inspector(tmp_path, "--method", "tools/list", "--strict", f"{base_url}/mcp")
    assert {tool["name"] for tool in listed["tools"]} >= {"sage_search", "sage_get_context", "sage_info"}

    call = ["--method", "tools/call", "--tool-name", "sage_search", "--tool-arg", "query=retry", "limit=3"]
    called = await inspector(tmp_path, f"{base_url}/mcp", *call)
    assert called["isError"] is False
    assert called["structuredContent"]["hits"][0]["id"] == "timeout-resilience"

    read = await inspector(tmp_path, "--method", "resources/read", "--uri", "knowledge://index", f"{base_url}/sse")
    assert "timeout-resilience" in read["contents"][0]["text"]


@pytest.mark.e2e
@needs_npx
async def test_inspector_lists_resources_templates_and_prompts_and_reads_a_document(
    base_url: str, tmp_path: Path
) -> None:
    mcp = f"{base_url}/mcp"
    resources = await inspector(tmp_path, "--method", "resources/list", mcp)
    uris = [resource["uri"] for resource in resources["resources"]]
    assert uris[0] == "knowledge://index" and "knowledge://frameworks/timeout-resilience" in uris

    templates = await inspector(tmp_path, "--method", "resources/templates/list", mcp)
    assert {t["uriTemplate"] for t in templates["resourceTemplates"]} == {
        "knowledge://{layer}",
        "knowledge://{layer}/{id}",
    }

    prompts = await inspector(tmp_path, "--method", "prompts/list", mcp)
    assert {prompt["name"] for prompt in prompts["prompts"]} >= {"code_review", "onboarding"}

    document = await inspector(
        tmp_path, "--method", "resources/read", "--uri", "knowledge://practices/handling-secrets", mcp
    )
    assert document["contents"][0]["text"].startswith("# Handling Secrets")


@pytest.mark.e2e
@needs_npx
async def test_inspector_saves_a_document_without_inventing_an_id(base_url: str, tmp_path: Path) -> None:
    call = ["--method", "tools/call", "--tool-name", "sage_save_knowledge"]
    saved = await inspector(tmp_path, f"{base_url}/mcp", *call, "--tool-arg", "title=Deploy Freeze", "body=No Fridays.")
    assert saved["structuredContent"]["id"] == "deploy-freeze" and saved["structuredContent"]["derived_id"] is True


@pytest.mark.e2e
@needs_npx
async def test_inspector_sees_a_tool_error_for_an_unknown_id(base_url: str, tmp_path: Path) -> None:
    call = ["--method", "tools/call", "--tool-name", "sage_get_document", "--tool-arg", "id=timeout-resiliense"]
    # The Inspector exits with 5 when the tool answered isError.
    result = await inspector(tmp_path, f"{base_url}/mcp", *call, exit_code=5)
    assert result["isError"] is True
    assert "did you mean timeout-resilience" in result["content"][0]["text"]


def stdio_flags(settings: Settings, tmp_path: Path) -> list[str]:
    env = subprocess_env(settings, tmp_path)
    return ["--cwd", str(tmp_path), *(flag for key, value in env.items() for flag in ("-e", f"{key}={value}"))]


@pytest.mark.e2e
@needs_npx
async def test_inspector_drives_sage_mcp_over_stdio(mcp_settings: Settings, tmp_path: Path) -> None:
    flags = stdio_flags(mcp_settings, tmp_path)
    listed = await inspector(tmp_path, "--method", "tools/list", *flags, *sage_mcp(mcp_settings))
    assert "sage_get_document" in {tool["name"] for tool in listed["tools"]}

    call = ["--method", "tools/call", "--tool-name", "sage_get_context", "--tool-arg", "task=add retries"]
    result = await inspector(tmp_path, *flags, *sage_mcp(mcp_settings), *call)
    assert "sage:timeout-resilience" in result["structuredContent"]["text"]
