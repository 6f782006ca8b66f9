"""SAGE over MCP: the server (tools, resources, prompts) and its stdio, streamable HTTP and SSE transports."""

from __future__ import annotations

from sage_server.assistant.server import build_server
from sage_server.assistant.transports import mcp_routes, serve_stdio, transport_security

__all__ = ["build_server", "mcp_routes", "serve_stdio", "transport_security"]
