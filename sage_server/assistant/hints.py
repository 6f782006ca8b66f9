"""Cache hints: how long a 2026-07-28 client may reuse a listing or a resource (`ttlMs`), and whether a shared cache
may hand it to anyone else (`cacheScope`).

The policy, from the settings: the knowledge (resources/read, resources/list) may be reused for
`mcp_cache_ttl_seconds`, and the catalog, which only changes when SAGE is upgraded (tools/list, prompts/list,
resources/templates/list, server/discover), for `mcp_catalog_ttl_seconds`; a watcher hears of changes to the
knowledge before its lifetime runs out (live.py). An answer is `public` only while it cannot depend on who asks:
no credential is configured and the caller is anonymous. Once keys have scopes, what a caller may see depends on
its key, and every answer to a configured server is `private` already. An `input_required` round trip is never
hinted (the spec: clients must not cache them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp_types.methods import is_input_required
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from sage_server.auth import ANONYMOUS, Authenticator
from sage_server.config import Settings
from sage_server.errors import ConfigError

Scope = Literal["public", "private"]
KNOWLEDGE = frozenset({"resources/read", "resources/list"})
CATALOG = frozenset({"tools/list", "prompts/list", "resources/templates/list", "server/discover"})


def credentials_configured(settings: Settings) -> bool:
    """Whether HTTP requests must present a credential (SAGE_API_KEY or the generated admin key)."""
    try:
        return Authenticator.from_settings(settings).required
    except ConfigError:  # an admin key file that cannot be read: a credential is meant to be there
        return True


@dataclass(frozen=True)
class HintPolicy:
    """The stated policy: a lifetime per kind of result, and who may share it."""

    knowledge_ms: int
    catalog_ms: int
    shared: bool  # no credential configured: every caller is anonymous and sees the same

    @classmethod
    def from_settings(cls, settings: Settings) -> HintPolicy:
        return cls(
            knowledge_ms=settings.mcp_cache_ttl_seconds * 1000,
            catalog_ms=settings.mcp_catalog_ttl_seconds * 1000,
            shared=not credentials_configured(settings),
        )

    def ttl_ms(self, method: str) -> int | None:
        """The lifetime of a `method` result, or None for a method whose results take no hint."""
        if method in KNOWLEDGE:
            return self.knowledge_ms
        return self.catalog_ms if method in CATALOG else None

    def scope(self, principal: str | None) -> Scope:
        """`public` only when the answer cannot depend on who asks: a server with no credential configured, asked
        by an anonymous caller (HTTP) or the one that launched it (stdio, in process: no principal)."""
        return "public" if self.shared and principal in (None, ANONYMOUS.name) else "private"


class CacheHints:
    """Server middleware putting the policy's `ttlMs`/`cacheScope` on every 2026-07-28 result that takes them.

    MCP SDK 2.3 takes one fixed hint per method (`MCPServer(cache_hints=...)`), so the scope could not follow the
    caller; this sets both per request instead (nothing in SAGE's handlers sets them, so nothing is overridden).
    """

    def __init__(self, policy: HintPolicy) -> None:
        self.policy = policy

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        ttl = self.policy.ttl_ms(ctx.method)
        if ttl is None or ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS or not isinstance(result, dict):
            return result
        if is_input_required(result):
            return result
        token = get_access_token()
        return {**result, "ttlMs": ttl, "cacheScope": self.policy.scope(token.client_id if token else None)}
