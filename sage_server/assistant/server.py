"""The SAGE MCP server: one MCPServer with the tools, resources and prompts, over an open KnowledgeService."""

from __future__ import annotations

import hmac
from typing import Any

from mcp.server import MCPServer
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from pydantic import AnyHttpUrl

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


class ApiKeyVerifier:
    """Bearer auth for MCP over HTTP with the same key as the REST API (SAGE_API_KEY).

    stdio and the in-memory client never pass through it: a process that launched SAGE already owns it.
    """

    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._key):
            return AccessToken(token=token, client_id="api-key", scopes=[])
        return None


def build_server(service: KnowledgeService) -> MCPServer[Any]:
    """The MCP server for `service`, which the caller opens before serving and closes after."""
    settings = service.settings
    key = settings.api_key.get_secret_value() if settings.api_key else None
    server: MCPServer[Any] = MCPServer(
        name="sage",
        title="SAGE knowledge",
        version=__version__,
        instructions=INSTRUCTIONS,
        log_level=settings.log_level,
        token_verifier=ApiKeyVerifier(key) if key else None,
        # SAGE checks its own key and issues no tokens: no OAuth metadata is served (resource_server_url=None).
        auth=AuthSettings(issuer_url=AnyHttpUrl(f"http://127.0.0.1:{settings.api_port}"), resource_server_url=None)
        if key
        else None,
    )
    register_tools(server, service)
    register_resources(server, service)
    register_prompts(server, service)
    return server
