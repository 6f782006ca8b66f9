"""The MCP face exact to the specification where clients are strict: Mcp-* header values with surrounding whitespace
(over real HTTP, the layer that refused them), and ids an assistant need not invent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.inbound import InboundLadderRejection, classify_inbound_request
from mcp_types import HEADER_MISMATCH

from sage_server.app import create_mcp_app
from sage_server.assistant import build_server
from sage_server.config import Settings
from sage_server.service import KnowledgeService, open_service
from tests.mcp_support import error_text, payload, serving, settings_for, write_knowledge

pytestmark = pytest.mark.anyio

ENVELOPE = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
CALL_INFO = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "sage_info", "arguments": {}, "_meta": ENVELOPE},
}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}


@pytest.fixture
def mcp_settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path, write_knowledge(tmp_path / "kb"))


@pytest.fixture
async def base_url(mcp_settings: Settings) -> AsyncIterator[str]:
    async with serving(create_mcp_app(mcp_settings)) as url:
        yield url


async def raw_post(url: str, body: dict[str, Any], headers: list[tuple[str, str]]) -> tuple[int, dict[str, str], str]:
    """POST /mcp with header lines written exactly as given (an HTTP client library would trim or refuse them)."""
    host, port = url.removeprefix("http://").split(":")
    payload_bytes = json.dumps(body).encode()
    lines = [
        "POST /mcp HTTP/1.1",
        "Host: localhost",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"Content-Length: {len(payload_bytes)}",
        "Connection: close",
        *(f"{name}:{value}" for name, value in headers),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload_bytes
    received = b""
    with anyio.fail_after(30):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(request)
            try:
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    head, _, content = received.decode().partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    answer_headers = {name.lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), answer_headers, content


@pytest.mark.parametrize("space", [" ", "\t", "  \t "])
async def test_mcp_header_values_may_carry_surrounding_whitespace(base_url: str, space: str) -> None:
    # RFC 9110 section 5.5: the whitespace is not part of the value. httptools drops the leading, not the trailing.
    headers = [
        ("MCP-Protocol-Version", f"{space}2026-07-28{space}"),
        ("Mcp-Method", f"{space}tools/call{space}"),
        ("Mcp-Name", f"{space}sage_info{space}"),
    ]
    status, _, content = await raw_post(base_url, CALL_INFO, headers)
    assert status == 200, content
    assert json.loads(content)["result"]["structuredContent"]["version"]


async def test_an_older_client_with_whitespace_in_its_version_header_keeps_its_protocol(base_url: str) -> None:
    status, headers, content = await raw_post(base_url, INITIALIZE, [("MCP-Protocol-Version", "2025-11-25 \t")])
    assert status == 200, content
    assert headers.get("mcp-session-id") and '"protocolVersion":"2025-11-25"' in content


async def test_a_name_that_does_not_match_is_still_refused(base_url: str) -> None:
    headers = [("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/call"), ("Mcp-Name", " sage_search ")]
    status, _, content = await raw_post(base_url, CALL_INFO, headers)
    assert status == 400 and str(HEADER_MISMATCH) in content


def test_the_sdk_still_compares_mcp_headers_byte_for_byte() -> None:
    # SAGE trims Mcp-* header values before the SDK sees them (transports.TrimmedMcpHeaders) because MCP SDK 2.3
    # compares them exactly. When this fails, the SDK trims them itself and the wrapper can go.
    headers = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "sage_info "}
    verdict = classify_inbound_request(CALL_INFO, headers=headers)
    assert isinstance(verdict, InboundLadderRejection) and verdict.code == HEADER_MISMATCH


# -- ids an assistant need not invent -------------------------------------------------------------------------


@pytest.fixture
async def kb(mcp_settings: Settings) -> AsyncIterator[KnowledgeService]:
    async with open_service(mcp_settings) as service:
        yield service


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_document_saved_without_an_id_gets_one_from_its_title(kb: KnowledgeService, mode: str) -> None:
    async with Client(build_server(kb), mode=mode) as client:
        saved = payload(
            await client.call_tool("sage_save_knowledge", {"title": "Rate Limits: 101", "body": "Buckets."})
        )
        assert saved["id"] == "rate-limits-101" and saved["derived_id"] is True and saved["revision"] == 1
        assert (await kb.get("rate-limits-101")).title == "Rate Limits: 101"

        # The same title again names the same id: refused, saying which id and how to mean it.
        again = {"title": "Rate limits 101", "body": "Leaky buckets."}
        refused = error_text(await client.call_tool("sage_save_knowledge", again))
        assert "'rate-limits-101' derived from the title is taken (revision 1)" in refused
        assert "expected_revision=1" in refused
        assert (await kb.get("rate-limits-101")).body == "Buckets."

        updated = payload(await client.call_tool("sage_save_knowledge", {**again, "expected_revision": 1}))
        assert (updated["id"], updated["revision"], updated["derived_id"]) == ("rate-limits-101", 2, True)

        explicit = payload(await client.call_tool("sage_save_knowledge", {**again, "id": "my-own-id"}))
        assert explicit["id"] == "my-own-id" and explicit["derived_id"] is False


async def test_a_derived_id_never_takes_over_a_deleted_document(kb: KnowledgeService) -> None:
    async with Client(build_server(kb)) as client:
        payload(await client.call_tool("sage_save_knowledge", {"title": "Old note", "body": "x"}))
        await kb.delete("old-note")
        refused = error_text(await client.call_tool("sage_save_knowledge", {"title": "Old note", "body": "new"}))
        assert "taken (revision 2)" in refused
        assert (await kb.history("old-note")).deleted
