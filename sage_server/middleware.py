"""Plain ASGI middleware (BaseHTTPMiddleware would break streaming MCP responses): request ids, access logs,
HTTP metrics, and a request-body limit."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sage_server.logs import REQUEST, get_logger, log_event
from sage_server.metrics import Metrics

log = get_logger("http")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


class RequestContext:
    """Give every HTTP request an id (kept from X-Request-ID when sane), echo it in the response, then log one
    JSON line and record the request under its route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        client = scope.get("client")
        token = REQUEST.set({"request_id": request_id, "client": client[0] if client else "unknown"})
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or ("unmatched" if status == 404 else "other")
            self.metrics.http_request(template, scope["method"], status, elapsed)
            log_event(
                log,
                logging.INFO,
                "Request completed",
                operation="http",
                request_id=request_id,
                method=scope["method"],
                path=scope["path"],
                route=template,
                status=status,
                duration_ms=round(elapsed * 1000, 3),
            )
            REQUEST.reset(token)


class BodyLimit:
    """Answer 413 to a request body over `max_bytes`, declared or streamed, before the app reads it whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = (
            b'{"error":{"status":413,"code":"payload_too_large","message":"request body is over '
            + str(self.max_bytes).encode()
            + b' bytes","details":{}}}'
        )
        headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    """Raised inside the app's receive() when the streamed body passes the limit."""


class RateLimit:
    """Per-client token buckets: `per_minute` requests a minute, in bursts of up to ten seconds' worth; over it,
    429 with Retry-After. Probes (/health, /ready) are never limited."""

    EXEMPT = ("/health", "/ready")
    MAX_CLIENTS = 10_000  # the oldest idle bucket goes first past this, so memory stays bounded

    def __init__(self, app: ASGIApp, per_minute: int) -> None:
        self.app = app
        self.rate = per_minute / 60
        self.capacity = max(1.0, self.rate * 10)
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.EXEMPT:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        key = client[0] if client else "unknown"
        now = time.monotonic()
        tokens, last = self.buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if len(self.buckets) >= self.MAX_CLIENTS:
            self.buckets.pop(next(iter(self.buckets)))
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            wait = max(1, int((1 - tokens) / self.rate + 0.999))
            body = (
                b'{"error":{"status":429,"code":"rate_limited","message":"too many requests; retry after '
                + str(wait).encode()
                + b' s","details":{}}}'
            )
            headers: list[Any] = [
                (b"content-type", b"application/json"),
                (b"retry-after", str(wait).encode()),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.buckets[key] = (tokens - 1, now)  # re-inserted last: the dict stays in least-recently-used order
        await self.app(scope, receive, send)
