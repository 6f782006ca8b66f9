"""Serving MCP: stdio for assistants that launch SAGE, streamable HTTP at /mcp and legacy SSE at /sse."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import BaseRoute, Route

from sage_server.assistant.server import build_server
from sage_server.config import Settings
from sage_server.hosts import ANY_HOST, allowed_names
from sage_server.service import open_service


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """The SDK's own DNS-rebinding check, from the same rule the front door applies to every route (see hosts.py):
    Host and Origin headers naming localhost, the configured host or one of `allowed_hosts`, on any port."""
    names = allowed_names(settings)
    if ANY_HOST in names:  # the operator allows any Host: the front door still refuses foreign Origins on writes
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[form for name in names for form in (name, f"{name}:*")],
        allowed_origins=[
            form
            for name in names
            for scheme in ("http", "https")
            for form in (f"{scheme}://{name}", f"{scheme}://{name}:*")
        ],
    )


async def serve_stdio(settings: Settings) -> None:
    """Open the knowledge base and serve MCP on stdin/stdout until the client closes stdin.

    stdout carries only protocol messages (the SDK points fd 1 at stderr while it serves); logs go to stderr.
    """
    async with open_service(settings, fallback=True) as service:
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
