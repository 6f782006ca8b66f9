"""Serving MCP: stdio for assistants that launch SAGE, streamable HTTP at /mcp and legacy SSE at /sse."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectSendStream
from mcp.server import MCPServer
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sage_server.assistant.server import build_server
from sage_server.assistant.sessions import InstanceSessions, SessionCap
from sage_server.config import Settings
from sage_server.hosts import ANY_HOST, allowed_names
from sage_server.logs import get_logger, log_event
from sage_server.service import open_service
from sage_server.signals import StopSignals

log = get_logger("mcp")


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """The SDK's own DNS-rebinding check, from the same rule the front door applies to every route (see hosts.py):
    Host and Origin headers naming localhost, the configured host or one of `allowed_hosts`, on any port."""
    names = allowed_names(settings)
    if ANY_HOST in names:  # the operator allows any Host: the front door still refuses foreign Origins
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
    """Open the knowledge base and serve MCP on stdin/stdout until the client closes stdin, or until SIGTERM or
    SIGINT (Ctrl-C), which end it cleanly too (exit 0).

    stdout carries only protocol messages (the SDK points fd 1 at stderr while it serves); logs go to stderr.
    """
    async with open_service(settings, fallback=True) as service:
        server = build_server(service)
        with StopSignals() as signals:
            async with anyio.create_task_group() as tg:

                async def stop_on_signal() -> None:
                    signum = await signals.wait()
                    log_event(log, logging.INFO, "Shutting down", operation="mcp_stdio", signal=signum.name)
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_on_signal)
                await _run_stdio(server, StdinLines(sys.stdin.fileno()))
                tg.cancel_scope.cancel()  # the client closed stdin


async def _run_stdio(server: MCPServer[Any], stdin: StdinLines) -> None:
    """What `MCPServer.run_stdio_async` does, with our own stdin: in MCP SDK 2.3 it reads stdin in an anyio worker
    thread that cancellation waits for, so a signal could not end the server before the client wrote a line or
    closed stdin (Ctrl-C was ignored). The SDK's stdio_server takes any async iterable of lines as stdin."""
    lowlevel = server._lowlevel_server
    async with stdio_server(stdin=cast(anyio.AsyncFile[str], stdin)) as (read_stream, write_stream):
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


class StdinLines:
    """The lines of a file descriptor (stdin) as text, read by a daemon thread with plain `os.read`: a blocked read
    never delays the end of the server nor the process's exit (a buffered file object's lock, held by a daemon
    thread at exit, would abort the interpreter)."""

    CHUNK = 65_536

    def __init__(self, fd: int) -> None:
        self.fd = fd

    async def __aiter__(self) -> AsyncIterator[str]:
        send, receive = anyio.create_memory_object_stream[str](1)
        token = anyio.lowlevel.current_token()
        threading.Thread(target=self._read, args=(send, token), name="sage-stdin", daemon=True).start()
        async with receive:
            async for line in receive:
                yield line

    def _read(self, send: MemoryObjectSendStream[str], token: anyio.lowlevel.EventLoopToken) -> None:
        pending = bytearray()
        try:
            while chunk := os.read(self.fd, self.CHUNK):
                start = len(pending)
                pending += chunk
                while (end := pending.find(b"\n", start)) >= 0:
                    line = pending[: end + 1].decode("utf-8", errors="replace")
                    del pending[: end + 1]
                    start = 0
                    anyio.from_thread.run(send.send, line, token=token)
            if pending:
                anyio.from_thread.run(send.send, pending.decode("utf-8", errors="replace"), token=token)
            anyio.from_thread.run_sync(send.close, token=token)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError, OSError):
            pass  # the server stopped reading (or the loop is gone): nothing is waiting for these lines


class TrimmedMcpHeaders:
    """The streamable-HTTP app, given `Mcp-*` header values without surrounding spaces and tabs.

    RFC 9110 section 5.5: leading and trailing whitespace is no part of a field value. uvicorn's httptools parser
    (uvicorn 0.54, httptools 0.9) drops the leading whitespace but keeps the trailing, and MCP SDK 2.3 compares
    `Mcp-Name`, `Mcp-Method` and `MCP-Protocol-Version` with the request body byte for byte: `Mcp-Name: sage_info `
    was refused with -32020 (header mismatch), and `MCP-Protocol-Version: 2025-11-25 ` sent an older client's
    request to the 2026-07-28 entry, which refused it. tests/test_mcp_spec.py tells when the SDK trims them itself.
    """

    WHITESPACE = b" \t"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [
                (name, value.strip(self.WHITESPACE) if name.startswith(b"mcp-") else value)
                for name, value in scope["headers"]
            ]
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


def mcp_routes(server: MCPServer[Any], settings: Settings) -> list[BaseRoute]:
    """Routes serving `server`: streamable HTTP at /mcp, legacy SSE at /sse (posting to /messages/).

    Call once per server: it builds the session manager, which the host app's lifespan must enter with
    `server.session_manager.run()` (a mounted app's own lifespan never runs).
    """
    security = transport_security(settings)
    # The streamable app keeps its own /mcp route and sits behind a Route of the same path, not a Mount: under
    # Mount("/mcp") POST /mcp answers a 307 redirect, and a Mount("/") would take the host app's 404s.
    streamable = server.streamable_http_app(
        transport_security=security,
        session_idle_timeout=settings.mcp_session_idle_seconds,
        max_sessions=settings.mcp_max_sessions,
    )
    sessions: ASGIApp = SessionCap(streamable, server.session_manager, settings.mcp_max_sessions)
    if settings.instance_name:
        sessions = InstanceSessions(sessions, settings.instance_name)
    sse = server.sse_app(transport_security=security)
    return [*sse.routes, Route("/mcp", endpoint=TrimmedMcpHeaders(sessions))]
