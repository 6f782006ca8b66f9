"""Cache hints: how long a 2026-07-28 client may reuse a listing or a resource (`ttlMs`), and whether a shared cache
may hand it to anyone else (`cacheScope`).

The policy, from the settings: the knowledge (resources/read, resources/list) may be reused for
`mcp_cache_ttl_seconds`, and the catalog, which only changes when SAGE is upgraded (tools/list, prompts/list,
resources/templates/list, server/discover), for `mcp_catalog_ttl_seconds`; a watcher hears of changes to the
knowledge before its lifetime runs out (live.py). An answer is `public` only while it cannot depend on who asks:
no credential exists, so every HTTP caller is anonymous with every scope (or the caller is the process that
launched SAGE: stdio, in process). Once any key exists, what a caller may do depends on its key's scopes (and an
anonymous reader's, with SAGE_ALLOW_ANONYMOUS, on none), so every answer is `private`. The rule reads the request's
principal, so it follows keys created or revoked while SAGE runs. An `input_required` round trip is never hinted (the
spec: clients must not cache them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp_types.methods import is_input_required
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from sage_server.auth import ANONYMOUS
from sage_server.config import Settings

Scope = Literal["public", "private"]
KNOWLEDGE = frozenset({"resources/read", "resources/list"})
CATALOG = frozenset({"tools/list", "prompts/list", "resources/templates/list", "server/discover"})


@dataclass(frozen=True)
class HintPolicy:
    """The stated policy: a lifetime per kind of result, and who may share it."""

    knowledge_ms: int
    catalog_ms: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HintPolicy:
        return cls(
            knowledge_ms=settings.mcp_cache_ttl_seconds * 1000, catalog_ms=settings.mcp_catalog_ttl_seconds * 1000
        )

    def ttl_ms(self, method: str) -> int | None:
        """The lifetime of a `method` result, or None for a method whose results take no hint."""
        if method in KNOWLEDGE:
            return self.knowledge_ms
        return self.catalog_ms if method in CATALOG else None

    @staticmethod
    def scope(caller: AccessToken | None) -> Scope:
        """`public` only when the answer cannot depend on who asks: the caller launched SAGE (stdio, in process: no
        token), or is the anonymous caller with every scope that every HTTP request is while no credential exists."""
        if caller is None:
            return "public"
        anonymous = caller.client_id == ANONYMOUS.name and frozenset(caller.scopes) == ANONYMOUS.scopes
        return "public" if anonymous else "private"


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
        return {**result, "ttlMs": ttl, "cacheScope": self.policy.scope(get_access_token())}
