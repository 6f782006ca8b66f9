"""MCP sessions of the 2025-11-25 handshake are bounded: idle ones expire, and at the cap the oldest idle one goes.

A real uvicorn server and real HTTP: abandoned sessions are opened the way a client that vanishes leaves them
(initialize, initialized, then nothing), and a real MCP client must still be served.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from starlette.applications import Starlette
from starlette.routing import Route

from sage_server.app import create_mcp_app
from sage_server.assistant.sessions import SessionCap
from sage_server.assistant.transports import TrimmedMcpHeaders
from tests.mcp_support import serving, settings_for, write_knowledge

pytestmark = pytest.mark.anyio

ACCEPT = {"Accept": "application/json, text/event-stream"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "gone", "version": "1"}},
}


def session_cap(app: Starlette) -> SessionCap:
    """The session cap in front of the app's streamable-HTTP endpoint."""
    [route] = [r for r in app.routes if isinstance(r, Route) and r.path == "/mcp"]
    assert isinstance(route.endpoint, TrimmedMcpHeaders) and isinstance(route.endpoint.app, SessionCap)
    return route.endpoint.app


@asynccontextmanager
async def mcp_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[str, SessionCap]]:
    app = create_mcp_app(settings_for(tmp_path, write_knowledge(tmp_path / "kb"), **overrides))
    async with serving(app) as url:
        yield url, session_cap(app)


def session_headers(session_id: str) -> dict[str, str]:
    return {**ACCEPT, "mcp-session-id": session_id, "mcp-protocol-version": "2025-11-25"}


async def abandoned_session(http: httpx2.AsyncClient) -> str:
    """Open a session as a client does, then walk away from it; returns its id."""
    opened = await http.post("/mcp", json=INITIALIZE, headers=ACCEPT)
    assert opened.status_code == 200, opened.text
    session_id = opened.headers["mcp-session-id"]
    ready = await http.post(
        "/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session_headers(session_id)
    )
    assert ready.status_code == 202
    return session_id


async def ping(http: httpx2.AsyncClient, session_id: str) -> int:
    """The status of a ping in the session: 200 while it lives, 404 once it is gone."""
    answer = await http.post(
        "/mcp", json={"jsonrpc": "2.0", "id": 9, "method": "ping"}, headers=session_headers(session_id)
    )
    return answer.status_code


async def test_live_sessions_stay_under_the_cap_and_the_longest_idle_goes(tmp_path: Path) -> None:
    async with mcp_server(tmp_path, mcp_max_sessions=3) as (url, cap):
        async with httpx2.AsyncClient(base_url=url) as http:
            first, second, third = [await abandoned_session(http) for _ in range(3)]
            assert cap.live == 3
            assert await ping(http, first) == 200  # `first` is used again: now `second` has been idle longest

            fourth = await abandoned_session(http)
            assert cap.live == 3 and cap.evicted == 1
            assert [await ping(http, s) for s in (first, second, third, fourth)] == [200, 404, 200, 200]

            seen = []
            for _ in range(7):  # many more abandoned sessions: never more than three alive
                await abandoned_session(http)
                seen.append(cap.live)
            assert seen == [3] * 7

        # A real client is still served, and still counted under the cap while it lives.
        with anyio.fail_after(30):
            async with Client(f"{url}/mcp", mode="legacy") as client:
                assert cap.live == 3
                assert {tool.name for tool in (await client.list_tools()).tools} >= {"sage_search"}
                result = await client.call_tool("sage_search", {"query": "retry budget"})
                assert not result.is_error
            # The sessionless 2026-07-28 era holds no session at all.
            async with Client(f"{url}/mcp") as modern:
                await modern.list_tools()
        assert cap.live <= 3


async def test_a_session_busy_with_a_stream_is_never_evicted(tmp_path: Path) -> None:
    async with mcp_server(tmp_path, mcp_max_sessions=1) as (url, cap):
        async with httpx2.AsyncClient(base_url=url) as http:
            listening = await abandoned_session(http)
            with anyio.fail_after(30):
                async with http.stream("GET", "/mcp", headers=session_headers(listening)) as stream:
                    assert stream.status_code == 200  # the standalone event stream holds the session open
                    refused = await http.post("/mcp", json=INITIALIZE, headers=ACCEPT)
                    assert refused.status_code == 503  # the only session is busy: nothing to evict
                    assert cap.live == 1 and cap.evicted == 0
                # The stream closed: once the server has seen it go, the session is idle and gives way.
                while (opened := await http.post("/mcp", json=INITIALIZE, headers=ACCEPT)).status_code == 503:
                    await anyio.sleep(0.05)
                newcomer = opened.headers["mcp-session-id"]
            assert await ping(http, newcomer) == 200
            assert await ping(http, listening) == 404
            assert cap.live == 1


async def test_idle_sessions_expire(tmp_path: Path) -> None:
    async with mcp_server(tmp_path, mcp_session_idle_seconds=1) as (url, cap):
        async with httpx2.AsyncClient(base_url=url) as http:
            gone = [await abandoned_session(http) for _ in range(4)]
            assert cap.live == 4
            with anyio.fail_after(20):
                while cap.live:
                    await anyio.sleep(0.05)
            assert [await ping(http, s) for s in gone] == [404] * 4
        with anyio.fail_after(30):
            async with Client(f"{url}/mcp", mode="legacy") as client:
                await client.list_tools()


async def test_session_ids_carry_the_instance_name_for_the_balancer(tmp_path: Path) -> None:
    app = create_mcp_app(settings_for(tmp_path, write_knowledge(tmp_path / "kb"), instance_name="sage-b"))
    async with serving(app) as url, httpx2.AsyncClient(base_url=url) as http:
        session_id = await abandoned_session(http)
        bare = session_id.removeprefix("sage-b.")
        assert session_id.startswith("sage-b.") and bare and "." not in bare
        assert await ping(http, session_id) == 200
        # Another instance's id names no session here: 404, and the client starts a new one.
        assert await ping(http, f"sage-a.{bare}") == 404
        with anyio.fail_after(30):
            async with Client(f"{url}/mcp", mode="legacy") as client:
                result = await client.call_tool("sage_search", {"query": "retry budget"})
                assert not result.is_error
