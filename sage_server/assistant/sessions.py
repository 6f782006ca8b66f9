"""Bounds on MCP sessions of the 2025-11-25 handshake: idle ones expire, and at the cap the oldest idle one goes."""

from __future__ import annotations

import logging
import math

import anyio
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER, StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sage_server.logs import get_logger, log_event

log = get_logger("mcp")
_SESSION_HEADER = MCP_SESSION_ID_HEADER.lower().encode()
_VERSION_HEADER = b"mcp-protocol-version"


class SessionCap:
    """The streamable-HTTP app with at most `cap` live sessions: a request that would open one more first closes
    the session idle the longest. Sessions busy serving a request (an open GET stream included) are never
    evicted; when every session is busy the SDK answers 503 and no session is lost.

    Idle expiry itself is the SDK's (`session_idle_timeout`, set from `mcp_session_idle_seconds`); the cap is ours:
    MCP SDK 2.3 refuses new sessions with 503 at `max_sessions` and evicts none, so an abandoned session (about
    40 KB each) would hold its place until it expires. The SDK keeps the sessions in the manager's private
    `_server_instances` (session id -> transport) and forgets one with `_discard_session`; we use both, and read
    each transport's public `idle_scope` (its deadline is the moment the session expires, infinite while a request
    is in flight), so the session that expires soonest is the one idle the longest.
    """

    def __init__(self, app: ASGIApp, manager: StreamableHTTPSessionManager, cap: int) -> None:
        if cap < 1:
            raise ValueError("the session cap must be at least 1")
        self.app = app
        self.manager = manager
        self.cap = cap
        self._lock = anyio.Lock()
        self._opening = 0  # requests that may open a session and have not been answered yet
        self.evicted = 0

    @property
    def live(self) -> int:
        """Sessions the SDK holds now."""
        return len(self._sessions())

    def _sessions(self) -> dict[str, StreamableHTTPServerTransport]:
        return self.manager._server_instances  # MCP SDK 2.3: see the class docstring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _opens_session(scope):
            await self.app(scope, receive, send)
            return
        async with self._lock:
            self._opening += 1
            await self._make_room()
        answered = False

        async def watch(message: Message) -> None:
            nonlocal answered
            if not answered and message["type"] == "http.response.start":
                answered = True
                self._opening -= 1
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not answered:
                self._opening -= 1

    async def _make_room(self) -> None:
        """Evict idle sessions, oldest first, until this request and any opening with it fit under the cap. Two
        openings in flight together may evict one more than needed, never leave one over the cap."""
        sessions = self._sessions()
        while len(sessions) + self._opening > self.cap:
            idle = [
                (transport.idle_scope.deadline, session_id, transport)
                for session_id, transport in sessions.items()
                if transport.idle_scope is not None
                and math.isfinite(transport.idle_scope.deadline)
                and not transport.is_terminated
            ]
            if not idle:
                return  # every session is busy: the SDK refuses this one with 503
            _, session_id, transport = min(idle, key=lambda entry: entry[0])
            await self.manager._discard_session(session_id, transport)  # MCP SDK 2.3: see the class docstring
            self.evicted += 1
            log_event(
                log, logging.INFO, "MCP session evicted", operation="mcp_session", cap=self.cap, live=len(sessions)
            )


def _opens_session(scope: Scope) -> bool:
    """Whether the SDK would open a stateful session for this request: no session id, and the handshake era (a
    2026-07-28 request is sessionless and holds nothing)."""
    version: bytes | None = None
    for name, value in scope["headers"]:
        if name == _SESSION_HEADER:
            return False
        if name == _VERSION_HEADER:
            version = value
    return version is None or version.decode("latin-1") in HANDSHAKE_PROTOCOL_VERSIONS


class InstanceSessions:
    """The streamable-HTTP app with session ids tagged by this instance's name (`instance_name`): the id a client
    gets is `<name>.<id>`, so a load balancer can send every request of a session to the instance holding it, by
    the `Mcp-Session-Id` header alone (nginx: a `map` on its prefix; see deploy/nginx.conf).

    A session of the 2025-11-25 handshake lives in one process's memory; the 2026-07-28 protocol is sessionless
    and needs none of this. A request carrying another instance's (or an untagged) id reaches the SDK unchanged and
    is answered 404, as for any unknown session: the client then starts a new one, as the specification says.
    """

    def __init__(self, app: ASGIApp, instance: str) -> None:
        self.app = app
        self.prefix = f"{instance}.".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [
            (name, value.removeprefix(self.prefix) if name == _SESSION_HEADER else value)
            for name, value in scope["headers"]
        ]

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [
                        (name, self.prefix + value if name.lower() == _SESSION_HEADER else value)
                        for name, value in message.get("headers", [])
                    ],
                }
            await send(message)

        await self.app({**scope, "headers": headers}, receive, tagged)
