"""Connection deadlines uvicorn lacks: a connection that sends nothing, or its headers or body too slowly, is closed."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sage_server.config import Settings
from sage_server.logs import get_logger, log_event

log = get_logger("http")


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take, and how much header it may send (see the README's Operations section)."""

    idle_seconds: float
    header_seconds: float
    body_seconds: float
    max_header_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            idle_seconds=settings.idle_timeout_seconds,
            header_seconds=settings.header_timeout_seconds,
            body_seconds=settings.body_timeout_seconds,
            max_header_bytes=settings.max_header_bytes,
        )


class ClosedLog:
    """One WARNING for the first connection closed for slowness, then at most one a minute with the count: a
    slowloris attack of thousands of sockets must not flood the log."""

    EVERY_SECONDS: Final = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since_logged = 0
        self._logged_at: float | None = None

    def closed(self, reason: str) -> None:
        self._since_logged += 1
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= self.EVERY_SECONDS:
            log_event(
                log, logging.WARNING, "Closed slow client connections", reason=reason, connections=self._since_logged
            )
            self._logged_at = now
            self._since_logged = 0


REFUSALS: Final = {
    408: ("Request Timeout", "request_timeout"),
    431: ("Request Header Fields Too Large", "headers_too_large"),
}


def _error(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response in the one JSON error shape, closing the connection."""
    phrase, code = REFUSALS[status]
    body = json.dumps({"error": {"status": status, "code": code, "message": message, "details": {}}}).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines it lacks (uvicorn 0.54 arms its keep-alive timer only after a
    response and has no header or body read timeout, and httptools accepts headers of any size):

    - idle: a connection with no request under way that sends nothing for `idle_seconds` is closed, the first
      request's wait included (bytes that start no request, such as stray blank lines, do not count as activity);
    - headers: the request line and headers must arrive within `header_seconds` of the request's first byte, and
      be at most about `max_header_bytes`, or the client gets 408 / 431 and the connection is closed;
    - body: the body must arrive within `body_seconds` of the headers, or 408 (if nothing was answered yet) and
      closed. Time the server itself holds the body back (flow control, a pending 100-continue) does not count.

    `limits` is set on a subclass made by `guarded_protocol`, since uvicorn builds protocols from a class.
    """

    limits: ClassVar[ConnectionLimits]
    closed_log: ClassVar[ClosedLog]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._reading: str | None = None  # "headers" or "body" while a request is arriving
        self._header_bytes = 0

    # -- idle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # cancels the idle timer, feeds the parser (which calls the hooks below)
        if self.transport.is_closing():
            return
        if self._reading == "headers":
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                limit = self.limits.max_header_bytes
                self._refuse(431, "headers", f"request headers are over {limit} bytes")
        elif self._reading is None and not self._request_under_way():
            self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _request_under_way(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_idle(self) -> None:
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.limits.idle_seconds, self.timeout_keep_alive_handler
            )

    # -- headers and body (httptools parser callbacks)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = "headers"
        self._header_bytes = 0
        self._set_deadline(self.limits.header_seconds, self._headers_too_slow)

    def on_headers_complete(self) -> None:
        self._reading = "body"
        self._set_deadline(self.limits.body_seconds, self._body_too_slow)  # cancelled at once without a body
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._reading = None
        self._cancel_deadline()
        super().on_message_complete()

    def _headers_too_slow(self) -> None:
        self._deadline = None
        seconds = self.limits.header_seconds
        self._refuse(408, "headers", f"request headers not received within {seconds:g} s")

    def _body_too_slow(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # The server holds the body back (the app has not read what came) or has not asked for it yet.
            self._set_deadline(self.limits.body_seconds, self._body_too_slow)
            return
        if cycle is not None and cycle.response_started:
            self.closed_log.closed("body")
            self.transport.close()  # the app answered already; it sees a disconnect
        else:
            seconds = self.limits.body_seconds
            self._refuse(408, "body", f"request body not received within {seconds:g} s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer `status` (408 or 431) and close; `reason` (headers, body) names the slow part in the log."""
        self._cancel_deadline()
        self._reading = None
        self.closed_log.closed(reason)
        self.transport.write(_error(status, message))
        self.transport.close()

    def _set_deadline(self, seconds: float, callback: Callable[[], None]) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` enforcing `limits` (shared by every connection it serves)."""
    return type("SageHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits, "closed_log": ClosedLog()})
