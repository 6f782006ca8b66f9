"""The SAGE MCP server: one MCPServer with the tools, resources and prompts, over an open KnowledgeService."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from mcp.server.request_state import AESGCMRequestStateCodec, RequestStateSecurity
from mcp_types import (
    PaginatedRequestParams,
    SubscribeRequestParams,
    SubscriptionsListenRequestParams,
    UnsubscribeRequestParams,
)

from sage_server.assistant.adapters import SageServer
from sage_server.assistant.hints import CacheHints, HintPolicy
from sage_server.assistant.live import LiveResources, honest_capabilities
from sage_server.assistant.prompts import register_prompts
from sage_server.assistant.resources import register_resources, resource_list
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


class DatabaseKeyCodec:
    """Seals the request state of input-required round trips (the confirmations, confirm.py) under a key derived
    from the database's identity, which every instance serving that database shares: a 2026-07-28 client may send
    its retry to any of them. (The SDK's default key is made per process, and another instance would refuse the
    state.) The state only carries the user's answers to SAGE's questions, which a client could give anyway; the
    seal keeps state from another database, or tampered with, out."""

    def __init__(self, service: KnowledgeService) -> None:
        self.service = service
        self._codec: AESGCMRequestStateCodec | None = None
        self._database = ""

    def _current(self) -> AESGCMRequestStateCodec:
        if self._codec is None or self._database != self.service.database_id:
            self._database = self.service.database_id  # a restored database gets a new identity, hence a new key
            self._codec = AESGCMRequestStateCodec([f"sage-request-state:{self._database}"])
        return self._codec

    def seal(self, payload: bytes) -> str:
        return self._current().seal(payload)

    def unseal(self, token: str) -> bytes:
        return self._current().unseal(token)


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
        request_state_security=RequestStateSecurity(codec=DatabaseKeyCodec(service)),
        subscriptions=False,  # SAGE serves subscriptions/listen itself (live.py)
        middleware=[honest_capabilities, CacheHints(HintPolicy.from_settings(service.settings))],
    )
    register_tools(server, service)
    register_resources(server, service)
    register_prompts(server, service)
    live = LiveResources(service.changes, service.settings.layers)
    # MCPServer (SDK 2.3) has no public way to add request handlers; its low-level server does.
    lowlevel = server._lowlevel_server
    lowlevel.add_request_handler("resources/list", PaginatedRequestParams, resource_list(service))
    lowlevel.add_request_handler("subscriptions/listen", SubscriptionsListenRequestParams, live.listen)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, live.subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, live.unsubscribe)
    return server
