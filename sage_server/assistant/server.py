"""The SAGE MCP server: one MCPServer with the tools, resources and prompts, over an open KnowledgeService."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer

from sage_server.assistant.adapters import SageServer
from sage_server.assistant.prompts import register_prompts
from sage_server.assistant.resources import register_resources
from sage_server.assistant.tools import register_tools
from sage_server.service import KnowledgeService
from sage_server.version import __version__

INSTRUCTIONS = """\
SAGE holds this team's knowledge: principles (the core layer), guidelines, frameworks, practices, scenarios \
and templates, as Markdown documents with ids.
- Starting a task: call sage_get_context with the task in plain words, and follow what it returns.
- Looking for something: sage_search, then sage_get_document to read a hit (by section for long documents).
- Every answer fits its max_tokens; when `truncated` is true, `hint` says how to get the rest.
- Writing: sage_save_knowledge with the revision you read as expected_revision; history keeps every revision."""


def build_server(service: KnowledgeService) -> MCPServer[Any]:
    """The MCP server for `service`, which the caller opens before serving and closes after."""
    # No token verifier here: over HTTP the app's front door (sage_server.auth) authenticates every route, MCP's
    # included, before the SDK sees a request, and leaves the principal where the SDK looks for it.
    server: MCPServer[Any] = SageServer(
        name="sage",
        title="SAGE knowledge",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level=service.settings.log_level,
    )
    register_tools(server, service)
    register_resources(server, service)
    register_prompts(server, service)
    return server
