"""The per-instance limit on HTTP requests in flight, and the end of event streams when the server shuts down."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sage_server.errors import error_document
from sage_server.logs import get_logger, log_event

log = get_logger("http")
# Probes always get an answer, at the limit and while shutting down, so load balancers see the truth.
PROBES: Final = frozenset({"/health", "/ready"})
RETRY_AFTER_SECONDS: Final = 1
DISCONNECT: Final[Message] = {"type": "http.disconnect"}
Rejected = Callable[[str, int], None]  # (method, status): for metrics


class RequestGate:
    """Counts the HTTP requests in flight across the apps it wraps (one gate per `sage serve`, so the limit is
    per instance). Past `limit`, a request is answered at once with 503 and Retry-After; probes are never
    counted nor refused. At shutdown, `close()` refuses new requests and ends open event streams (GET requests
    answered with text/event-stream: MCP's standalone stream and legacy SSE; and 2026-07-28 `subscriptions/listen`
    streams, which are POSTs), which would otherwise hold the server for its whole grace period; other requests in
    flight are left to finish.

    An open stream is a request in flight: it holds a connection and a task for as long as it lasts.
    """

    def __init__(self, limit: int, on_reject: Rejected | None = None) -> None:
        if limit < 1:
            raise ValueError("the in-flight limit must be at least 1")
        self.limit = limit
        self.in_flight = 0
        self.closing = False
        self._on_reject = on_reject
        self._flights: set[_Flight] = set()
        self._refused_since_log = 0
        self._logged_at: float | None = None

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """`app` behind this gate (lifespan and other non-HTTP scopes pass straight through)."""
        return _Gated(app, self)

    def close(self) -> None:
        """Refuse new requests (probes excepted) and end every event stream now."""
        self.closing = True
        for flight in list(self._flights):
            if flight.is_stream:
                flight.cut()

    def _admit(self) -> _Flight | None:
        if self.closing or self.in_flight >= self.limit:
            return None
        self.in_flight += 1
        flight = _Flight(self)
        self._flights.add(flight)
        return flight

    def _release(self, flight: _Flight) -> None:
        self.in_flight -= 1
        self._flights.discard(flight)

    def _refused(self, method: str) -> None:
        if self._on_reject is not None:
            self._on_reject(method, 503)
        if self.closing:
            return
        self._refused_since_log += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= 60:
            log_event(
                log,
                logging.WARNING,
                "Requests refused: too many in flight",
                limit=self.limit,
                refused=self._refused_since_log,
            )
            self._logged_at = now
            self._refused_since_log = 0


class _Flight:
    """One request in flight: whether its response is an event stream, and how to end it early."""

    def __init__(self, gate: RequestGate) -> None:
        self.gate = gate
        self.is_stream = False
        self.started = False
        self.complete = False
        self.cut_off = False
        self._waiting: anyio.CancelScope | None = None

    def cut(self) -> None:
        """End the stream: the app's next (or current) receive() says the client disconnected, and what it
        sends from now on is dropped; the response is then ended cleanly for the client."""
        self.cut_off = True
        if self._waiting is not None:
            self._waiting.cancel()

    def wrap_receive(self, receive: Receive) -> Receive:
        async def gated_receive() -> Message:
            if self.cut_off:
                return DISCONNECT
            with anyio.CancelScope() as scope:
                self._waiting = scope
                try:
                    return await receive()
                finally:
                    self._waiting = None
            return DISCONNECT  # reached only when cut() cancelled the wait

        return gated_receive

    def wrap_send(self, send: Send, endless: bool) -> Send:
        """`send`, noting the response start; `endless`: a request whose event stream never ends by itself."""

        async def gated_send(message: Message) -> None:
            if self.cut_off:
                return
            if message["type"] == "http.response.start":
                self.started = True
                self.is_stream = endless and _is_event_stream(message)
                await send(message)
                if self.is_stream and self.gate.closing:
                    self.cut()  # a stream that opened just as the server began to shut down
                return
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.complete = True
            await send(message)

        return gated_send


def _is_endless(scope: Scope) -> bool:
    """A GET (MCP's standalone stream, legacy SSE) or a 2026-07-28 `subscriptions/listen`: answered with an event
    stream, it lasts until the client leaves. Other POSTs may stream too, but they end when their work does."""
    if scope["method"] == "GET":
        return True
    return any(name == b"mcp-method" and value.strip() == b"subscriptions/listen" for name, value in scope["headers"])


def _is_event_stream(start: Message) -> bool:
    headers: list[tuple[bytes, bytes]] = start.get("headers", [])
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream") for name, value in headers)


class _Gated:
    """The ASGI app behind a gate."""

    def __init__(self, app: ASGIApp, gate: RequestGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        flight = self.gate._admit()
        if flight is None:
            self.gate._refused(scope["method"])
            await _unavailable(send, closing=self.gate.closing)
            return
        try:
            await self.app(scope, flight.wrap_receive(receive), flight.wrap_send(send, _is_endless(scope)))
            if flight.cut_off and flight.started and not flight.complete:
                # End the chunked body properly, so the client sees the stream close rather than a broken one.
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.gate._release(flight)


async def _unavailable(send: Send, closing: bool) -> None:
    message = (
        "the server is shutting down; retry on another instance"
        if closing
        else "too many requests in flight; retry shortly"
    )
    code = "shutting_down" if closing else "overloaded"
    body = json.dumps(error_document(503, code, message)).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
    ]
    if closing:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
