"""The app factories: the API listener (REST + /health + MCP), the MCP listener, and the metrics listener."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sage_server import rest
from sage_server.assistant import build_server, mcp_routes
from sage_server.config import Settings
from sage_server.errors import SageError
from sage_server.logs import get_logger, log_event
from sage_server.middleware import BodyLimit, RateLimit, RequestContext
from sage_server.service import KnowledgeService

log = get_logger("app")
# A document may be as large as max_file_bytes; JSON escaping can nearly double it.
BODY_OVERHEAD = 2


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    message = f"no route for {request.method} {request.url.path}" if status == 404 else str(getattr(exc, "detail", ""))
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": message, "details": {}}}, status_code=status
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    # The outermost layer: log once with the traceback, answer the one error shape without internals.
    log.exception("Unhandled error", extra={"context": {"operation": "http", "path": request.url.path}})
    error = SageError("internal error; the server log has the details")
    return rest.error_response(error)


def _build(settings: Settings, service: KnowledgeService | None, with_rest: bool) -> Starlette:
    kb = service or KnowledgeService(settings)
    server = build_server(kb)
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    routes: list[BaseRoute] = [*rest.routes(kb, api_key, probes_only=not with_rest)]
    all_routes = [*routes, *mcp_routes(server, settings)]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            if service is None:  # this app owns the service: open it, import in the background
                await kb.start(import_now=False, fallback=True)
                tg.start_soon(kb.import_configured)
            try:
                async with server.session_manager.run():
                    yield
            finally:
                tg.cancel_scope.cancel()
                if service is None:
                    await kb.close()
                    log_event(log, logging.INFO, "Service closed", operation="shutdown")

    app = Starlette(
        routes=all_routes,
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_found, Exception: _internal_error},
        middleware=[
            Middleware(RequestContext, metrics=kb.metrics),
            *(
                [Middleware(RateLimit, per_minute=settings.rate_limit_per_minute)]
                if settings.rate_limit_per_minute
                else []
            ),
            Middleware(BodyLimit, max_bytes=settings.max_file_bytes * BODY_OVERHEAD),
        ],
    )
    app.state.service = kb
    return app


def create_app(settings: Settings, service: KnowledgeService | None = None) -> Starlette:
    """The API listener: REST under /v1, /health, /ready, /openapi.json, and MCP at /mcp (and /sse) too,
    so a single exposed port serves scripts and assistants alike. Without `service`, the app opens its own."""
    return _build(settings, service, with_rest=True)


def create_mcp_app(settings: Settings, service: KnowledgeService | None = None) -> Starlette:
    """The MCP listener: streamable HTTP at /mcp, legacy SSE at /sse, and /health for probes."""
    return _build(settings, service, with_rest=False)


def create_metrics_app(service: KnowledgeService) -> Starlette:
    """The metrics listener: Prometheus text at /metrics (documents by layer are counted at scrape time)."""

    async def metrics(request: Request) -> Response:
        return Response(await service.scrape_metrics(), media_type=service.metrics.content_type)

    return Starlette(
        routes=[Route("/metrics", metrics, methods=["GET"])], exception_handlers={404: _not_found, 405: _not_found}
    )
