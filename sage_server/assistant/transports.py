"""Serving MCP: stdio for assistants that launch SAGE, streamable HTTP at /mcp and legacy SSE at /sse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route

from sage_server.assistant.server import build_server
from sage_server.config import Settings
from sage_server.service import KnowledgeService, open_service

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# Binding every interface says nothing about the name clients will use, so it adds no allowed Host.
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection: allow Host and Origin headers naming localhost or the configured host, any port."""
    host = settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal appears bracketed in Host and Origin headers
    hosts = [*LOCAL_HOSTS, *([host] if host not in (*LOCAL_HOSTS, *WILDCARD_HOSTS) else [])]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[form for name in hosts for form in (name, f"{name}:*")],
        allowed_origins=[
            form
            for name in hosts
            for scheme in ("http", "https")
            for form in (f"{scheme}://{name}", f"{scheme}://{name}:*")
        ],
    )


async def serve_stdio(settings: Settings) -> None:
    """Open the knowledge base and serve MCP on stdin/stdout until the client closes stdin.

    stdout carries only protocol messages (the SDK points fd 1 at stderr while it serves); logs go to stderr.
    """
    async with open_service(settings) as service:
        await build_server(service).run_stdio_async()


def mcp_routes(server: MCPServer[Any], settings: Settings) -> list[BaseRoute]:
    """Routes serving `server`: streamable HTTP at /mcp, legacy SSE at /sse (posting to /messages/).

    Call once per server: it builds the session manager, which the host app's lifespan must enter with
    `server.session_manager.run()` (a mounted app's own lifespan never runs).
    """
    security = transport_security(settings)
    # The streamable app keeps its own /mcp route and sits behind a Route of the same path, not a Mount: under
    # Mount("/mcp") POST /mcp answers a 307 redirect, and a Mount("/") would take the host app's 404s.
    streamable = server.streamable_http_app(transport_security=security)
    sse = server.sse_app(transport_security=security)
    return [*sse.routes, Route("/mcp", endpoint=streamable)]


def http_app(settings: Settings) -> Starlette:
    """The MCP HTTP app: streamable HTTP at /mcp (2026-07-28 sessionless and 2025-11-25 handshake), SSE at /sse.

    The lifespan opens the knowledge base and runs the streamable-HTTP session manager.
    """
    # The routes need the server, and the server a service, before the lifespan opens the database: so the
    # service is built unopened here and started in the lifespan (what open_service does in one step).
    service = KnowledgeService(settings)
    server = build_server(service)
    routes = mcp_routes(server, settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            async with server.session_manager.run():
                yield
        finally:
            await service.close()

    return Starlette(routes=routes, lifespan=lifespan)


async def serve_http(settings: Settings, host: str, port: int) -> None:
    """Serve `http_app` on `host`:`port` with uvicorn until interrupted; `host` is also an allowed Host header."""
    app = http_app(settings.model_copy(update={"host": host, "mcp_port": port}))
    # log_config=None: uvicorn's records go through the JSON logging the CLI set up.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="on", timeout_graceful_shutdown=5)
    await uvicorn.Server(config).serve()
