"""Serving MCP: stdio for assistants that launch SAGE, streamable HTTP at /mcp and legacy SSE at /sse."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import BaseRoute, Route

from sage_server.assistant.server import build_server
from sage_server.config import Settings
from sage_server.service import open_service

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# Binding every interface says nothing about the name clients will use, so it adds no allowed Host.
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection: allow Host and Origin headers naming localhost, the configured host or one of
    `allowed_hosts`, on any port."""
    host = settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal appears bracketed in Host and Origin headers
    named = [host] if host not in (*LOCAL_HOSTS, *WILDCARD_HOSTS) else []
    # Behind a proxy or in a container (bound to 0.0.0.0) clients use names only the operator knows.
    hosts = list(dict.fromkeys([*LOCAL_HOSTS, *named, *settings.allowed_hosts]))
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
