"""The app factories: the API listener (REST + /health + MCP), the MCP listener, and the metrics listener."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sage_server import rest
from sage_server.assistant import build_server, mcp_routes
from sage_server.auth import Authenticator
from sage_server.config import Settings
from sage_server.errors import SageError
from sage_server.hosts import HostRule
from sage_server.logs import get_logger, log_event
from sage_server.middleware import BodyLimit, FrontDoor, RequestContext, error_response
from sage_server.oauth import OAuthIssuer, metadata_route
from sage_server.ratelimit import RateLimit, RateLimiter
from sage_server.service import KnowledgeService

log = get_logger("app")
# A document may be as large as max_file_bytes; JSON escaping can nearly double it.
BODY_OVERHEAD = 2


# One rendering for every error, on every listener: SageErrors raised by routes, Starlette's 404/405 (with Allow) and
# a client gone before its body was read. Anything else is rendered by RequestContext, the outermost middleware.
EXCEPTION_HANDLERS = {HTTPException: error_response, SageError: error_response, ClientDisconnect: error_response}


def _build(
    settings: Settings, service: KnowledgeService | None, with_rest: bool, limiter: RateLimiter | None
) -> Starlette:
    kb = service or KnowledgeService(settings)
    server = build_server(kb)
    authenticator = Authenticator.from_settings(settings, kb.key_source)
    routes: list[BaseRoute] = [*rest.routes(kb, authenticator.required, probes_only=not with_rest)]
    issuer = next((source for source in authenticator.sources if isinstance(source, OAuthIssuer)), None)
    if issuer is not None:
        routes.append(metadata_route(issuer))
    all_routes = [*routes, *mcp_routes(server, settings)]
    # One limiter per instance: `sage serve` passes the one its API and MCP listeners share; an app built alone
    # makes (and closes) its own.
    own_limiter = limiter is None and settings.rate_limit_per_minute > 0
    if own_limiter:
        limiter = RateLimiter.from_settings(settings, on_breaker=kb.metrics.breaker_state)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            if service is None:  # this app owns the service: open it, import in the background
                await kb.start(import_now=False, fallback=True)
            async with anyio.create_task_group() as tg:
                if service is None:
                    tg.start_soon(kb.import_configured)
                try:
                    async with server.session_manager.run():
                        yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            # Out here: inside, the task group's cancelled scope would cut the closing short.
            if service is None:
                await kb.close()
                log_event(log, logging.INFO, "Service closed", operation="shutdown")
            if own_limiter and limiter is not None:
                await limiter.aclose()

    app = Starlette(
        routes=all_routes,
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            Middleware(RequestContext, metrics=kb.metrics),
            Middleware(FrontDoor, hosts=HostRule.from_settings(settings), authenticator=authenticator, observer=kb),
            # Behind the front door: a request counts against its key (or its address, without one).
            *([Middleware(RateLimit, limiter=limiter, observer=kb.metrics)] if limiter is not None else []),
            Middleware(BodyLimit, max_bytes=settings.max_file_bytes * BODY_OVERHEAD),
        ],
    )
    app.state.service = kb
    return app


def create_app(
    settings: Settings, service: KnowledgeService | None = None, limiter: RateLimiter | None = None
) -> Starlette:
    """The API listener: REST under /v1, /health, /ready, /openapi.json, and MCP at /mcp (and /sse) too,
    so a single exposed port serves scripts and assistants alike. Without `service`, the app opens its own; without
    `limiter`, it makes its own when `rate_limit_per_minute` asks for one. With OAuth configured, it also serves the
    protected-resource metadata of /mcp."""
    return _build(settings, service, with_rest=True, limiter=limiter)


def create_mcp_app(
    settings: Settings, service: KnowledgeService | None = None, limiter: RateLimiter | None = None
) -> Starlette:
    """The MCP listener: streamable HTTP at /mcp, legacy SSE at /sse, and /health for probes (and the OAuth
    protected-resource metadata, when configured)."""
    return _build(settings, service, with_rest=False, limiter=limiter)


def create_metrics_app(service: KnowledgeService) -> Starlette:
    """The metrics listener: Prometheus text at /metrics (documents by layer are counted at scrape time)."""

    async def metrics(request: Request) -> Response:
        return Response(await service.scrape_metrics(), media_type=service.metrics.content_type)

    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])], exception_handlers=EXCEPTION_HANDLERS)
