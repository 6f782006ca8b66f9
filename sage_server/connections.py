"""Connection deadlines uvicorn lacks: a connection that sends nothing, or its headers or body too slowly, is closed."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from sage_server.config import Settings
from sage_server.errors import error_document
from sage_server.logs import get_logger, log_event

log = get_logger("http")
# After a 408 or 431, how long the connection lingers, discarding input, before it is closed.
LINGER_SECONDS: Final = 2.0


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
    body = json.dumps(error_document(status, code, message)).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds it lacks (uvicorn 0.54 arms its keep-alive timer only after a
    response and has no header or body read timeout; httptools accepts headers of any size):

    - idle: a connection with no request under way is closed `idle_seconds` after it opened or after its last
      response; bytes that start no request (stray blank lines) do not extend that;
    - headers: the request line and headers must arrive within `header_seconds` of the request's first byte and
      be at most about `max_header_bytes`, or the client gets 408 / 431 and the connection is closed;
    - body: the body must arrive within `body_seconds` of the headers, or 408 and the connection is closed.

    A request reaches the app only once its body is in (or 64 KB of it, uvicorn's flow-control mark, or when it
    waits for 100-continue), so a slow client holds no app task and no slot of the in-flight limit, and a cut-off
    body never surfaces in the app as a disconnect. `limits` is set on a subclass made by `guarded_protocol`,
    since uvicorn builds protocols from a class.
    """

    limits: ClassVar[ConnectionLimits]
    closed_log: ClassVar[ClosedLog]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._reading: str | None = None  # "headers" or "body" while a request is arriving
        self._header_bytes = 0
        self._idle_until = 0.0  # loop time at which an idle connection is closed
        self._held: tuple[RequestResponseCycle, ASGI3Application] | None = None  # a request waiting for its body
        self._refused = False

    # -- idle connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_until = self.loop.time() + self.limits.idle_seconds
        self._arm_idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer when nothing is pipelined
        self._idle_until = self.loop.time() + self.limits.idle_seconds

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)  # cancels the idle timer, then feeds the parser (the hooks below)
        if self._refused or self.transport.is_closing():
            return
        if self._reading == "headers":
            self._header_bytes += len(data)  # headers still incomplete: httptools buffers them
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, "headers", f"request headers are over {self.limits.max_header_bytes} bytes")
        elif self._reading is None and not self._request_under_way():
            self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._held = None
        super().connection_lost(exc)

    def _request_under_way(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_idle(self) -> None:
        if self.timeout_keep_alive_task is None:
            remaining = max(0.0, self._idle_until - self.loop.time())
            self.timeout_keep_alive_task = self.loop.call_later(remaining, self.timeout_keep_alive_handler)

    # -- requests arriving (httptools parser callbacks)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = "headers"
        self._header_bytes = 0
        self._set_deadline(self.limits.header_seconds, self._headers_too_slow)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._refuse(431, "headers", f"request headers are over {self.limits.max_header_bytes} bytes")
            return
        self._reading = "body"
        self._set_deadline(self.limits.body_seconds, self._body_too_slow)  # cancelled at once without a body
        super().on_headers_complete()  # creates the cycle, then starts the app (see _start_asgi_task)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # uvicorn 0.54 starts the app as soon as the headers are in; hold it until the body is (see the class).
        if cycle is self.cycle and self._reading == "body" and not self.expect_100_continue:
            self._held = (cycle, app)
            return
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)
        if self._held is not None and self.flow.read_paused:
            self._release_held()  # 64 KB buffered: the app reads the rest as it comes

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._reading = None
        self._cancel_deadline()
        super().on_message_complete()
        self._release_held()

    def _release_held(self) -> None:
        if self._held is not None:
            cycle, app = self._held
            self._held = None
            super()._start_asgi_task(cycle, app)

    # -- deadlines

    def _headers_too_slow(self) -> None:
        self._deadline = None
        self._refuse(408, "headers", f"request headers not received within {self.limits.header_seconds:g} s")

    def _body_too_slow(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self._held is None and (self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue)):
            # The app holds the body back (it has not read what came) or has not asked for it yet.
            self._set_deadline(self.limits.body_seconds, self._body_too_slow)
            return
        if self._held is None and cycle is not None and cycle.response_started:
            self.closed_log.closed("body")
            self.transport.close()  # the app answered already (without reading it all); it sees a disconnect
            return
        self._refuse(408, "body", f"request body not received within {self.limits.body_seconds:g} s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer `status` (408 or 431) and close; `reason` (headers, body) names the slow part in the log."""
        self._refused = True
        self._cancel_deadline()
        self._reading = None
        self._held = None
        self.closed_log.closed(reason)
        self.transport.write(_error(status, message))
        if self.transport.can_write_eof():
            # Close our side only and drop what still comes for a moment: closing with the client's bytes unread
            # makes the kernel answer with a reset, which can destroy our answer before the client reads it.
            self.transport.write_eof()
            self.flow.resume_reading()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
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
