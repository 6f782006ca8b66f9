"""Plain ASGI middleware (BaseHTTPMiddleware would break streaming MCP responses): request ids, access logs and
HTTP metrics, the front door (Host, Origin, credentials) and a request-body limit (rate limits are in ratelimit.py);
and the one function that renders an error for HTTP."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Protocol

from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.authentication import AuthCredentials
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sage_server.auth import Authenticator, Caller, Principal, acting_as, with_resource_metadata
from sage_server.errors import (
    Forbidden,
    MethodNotAllowed,
    MisdirectedRequest,
    NotFound,
    PayloadTooLarge,
    SageError,
    Unauthorized,
    clip,
    error_document,
)
from sage_server.hosts import HostRule
from sage_server.logs import REQUEST, get_logger, log_event
from sage_server.metrics import Metrics
from sage_server.oauth import METADATA_PATH, metadata_url

log = get_logger("http")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Probes and load balancers call these by IP, without credentials.
OPEN_PATHS = ("/health", "/ready")
# Public documents: the Host rule applies (they name this server), no credential is asked, any Origin may read them.
PUBLIC_PATHS = (METADATA_PATH,)
MESSAGE_LIMIT = 500  # characters of an error message; details' strings get DETAIL_LIMIT
DETAIL_LIMIT = 200


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _bounded(value: Any) -> Any:
    """Details with every string cut to DETAIL_LIMIT: an error never echoes a huge input back."""
    if isinstance(value, str):
        return clip(value, DETAIL_LIMIT)
    if isinstance(value, dict):
        return {str(k): _bounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_bounded(v) for v in value[:50]]
    return value


def _as_sage_error(request: Request, exc: Exception) -> SageError:
    if isinstance(exc, SageError):
        return exc
    if isinstance(exc, HTTPException):
        where = f"{request.method} {clip(request.url.path)}"
        if exc.status_code == 404:
            return NotFound(f"no route for {where}")
        if exc.status_code == 405:
            allowed = dict(exc.headers or {}).get("Allow", "")
            return MethodNotAllowed(f"{where} is not allowed; allowed: {allowed}", headers=dict(exc.headers or {}))
        error = SageError(clip(str(exc.detail)), headers=dict(exc.headers or {}))
        error.status, error.code, error.internal = exc.status_code, "http_error", exc.status_code >= 500
        return error
    return SageError(f"{type(exc).__name__}: {exc}")


async def error_response(request: Request, exc: Exception) -> Response:
    """The one rendering of an error for HTTP: `{"error": {status, code, message, details}}` with the error's
    headers (Allow, Retry-After, WWW-Authenticate). Registered as the apps' exception handler and called by the
    outermost middleware for anything raised outside the routes. An internal error's text goes to the log with the
    request id; the client gets the code, a generic sentence and the id."""
    if isinstance(exc, ClientDisconnect):
        # The client went away (or was cut off for sending its body too slowly) before its request was read: not a
        # server error, and nobody receives this answer. 499 is nginx's "client closed request", for the access log.
        return Response(status_code=499)
    error = _as_sage_error(request, exc)
    request_id = str(request.scope.get("state", {}).get("request_id", ""))
    if error.internal:
        unexpected = not isinstance(exc, SageError | HTTPException)
        log.log(
            logging.ERROR if unexpected else logging.WARNING,
            "Unhandled error" if unexpected else "Error withheld from the client",
            exc_info=exc if unexpected else None,
            extra={
                "context": {
                    **(REQUEST.get() or {}),
                    "operation": "http",
                    "code": error.code,
                    "detail": error.message,
                    "path": clip(request.url.path),
                    "request_id": request_id,
                }
            },
        )
        message = f"{error.public_message} (request id {request_id})" if request_id else error.public_message
        details: dict[str, Any] = {"request_id": request_id} if request_id else {}
    else:
        message, details = clip(error.message, MESSAGE_LIMIT), _bounded(error.details)
    body = error_document(error.status, error.code, message, details)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


class RequestContext:
    """Give every HTTP request an id (kept from X-Request-ID when sane), echo it in the response, then log one
    JSON line and record the request under its route template.

    It is also the outermost error boundary: an error raised by the middleware inside it, or an unexpected exception
    from anywhere, is answered here through `error_response` and not re-raised, so a 500 does not cost the client its
    keep-alive connection (uvicorn drops the connection of an app that raises)."""

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
        responding = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, responding
            if message["type"] == "http.response.start":
                status, responding = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if responding:  # too late for an error body: uvicorn logs it and closes the connection
                raise
            await (await error_response(Request(scope), exc))(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or ("unmatched" if status == 404 else "other")
            self.metrics.http_request(template, scope["method"], status, elapsed)
            # The request's context (REQUEST) names its client and, once the front door let it in, its key.
            log_event(
                log,
                logging.INFO,
                "Request completed",
                operation="http",
                request_id=request_id,
                method=scope["method"],
                path=clip(scope["path"], 200),
                route=template,
                status=status,
                duration_ms=round(elapsed * 1000, 3),
            )
            REQUEST.reset(token)


class DoorObserver(Protocol):
    """Hears what the front door decided, for metrics and the audit trail (the service is one)."""

    def admitted(self, principal: Principal) -> None: ...

    def refused(self, client: str, reason: str) -> None: ...


class FrontDoor:
    """The one rule at the door of every route but the probes (/health, /ready), on every listener: the Host must
    name this server (421; DNS rebinding), a browser's Origin must be this server's (403; cross-site requests), and
    the request must carry a credential the authenticator accepts (401; with OAuth configured, the challenge names
    the protected-resource metadata, which is served to any Origin without a credential).

    The principal is left in the scope: `state['principal']` for SAGE, and `user`/`auth` as the MCP SDK reads them
    (it binds a session to the credential that opened it; `get_access_token()` names the caller in a handler)."""

    MAX_USERS = 1024  # SDK views of principals kept; principals are few (keys), but bounded all the same

    def __init__(
        self, app: ASGIApp, hosts: HostRule, authenticator: Authenticator, observer: DoorObserver | None = None
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.authenticator = authenticator
        self.observer = observer
        self._users: dict[Principal, tuple[AuthenticatedUser, AuthCredentials]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.hosts.host_allowed(host):
            raise MisdirectedRequest(
                f"this server does not answer to the name {clip(host or '(none)')!r}; "
                "an operator can add it to SAGE_ALLOWED_HOSTS",
                host=host,
            )
        if scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        origin = headers.get("origin")
        if origin is not None and not self.hosts.origin_allowed(origin, host):
            raise Forbidden(f"requests from pages at {clip(origin)!r} are refused (cross-site)", origin=origin)
        client = scope["client"][0] if scope.get("client") else "unknown"
        try:
            principal = await self.authenticator.authenticate(headers)
        except Unauthorized as exc:
            if self.observer is not None:
                self.observer.refused(client, str(exc.details.get("reason", "invalid")))
            if self.authenticator.oauth:
                with_resource_metadata(exc, metadata_url(scope.get("scheme", "http"), host))
            raise
        if self.observer is not None:
            self.observer.admitted(principal)
        request = REQUEST.get()
        if request is not None:
            request["key"] = principal.name  # every line logged during the request names the key
        seen = self._users.get(principal)
        if seen is None:
            if len(self._users) >= self.MAX_USERS:
                self._users.clear()
            seen = AuthenticatedUser(_access_token(principal)), AuthCredentials(sorted(principal.scopes))
            self._users[principal] = seen
        user, credentials = seen
        scope["state"]["principal"] = principal
        scope["user"], scope["auth"] = user, credentials
        context = auth_context_var.set(user)
        try:
            with acting_as(Caller(principal, client)):
                await self.app(scope, receive, send)
        finally:
            auth_context_var.reset(context)


def _access_token(principal: Principal) -> AccessToken:
    # The SDK's view of a principal; the secret itself is never kept in it.
    claims = {"iss": principal.issuer} if principal.issuer else None
    return AccessToken(
        token="", client_id=principal.name, scopes=sorted(principal.scopes), subject=principal.subject, claims=claims
    )


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
            raise self._too_large()
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except PayloadTooLarge:
            if not started:  # the app may have answered already (the MCP SDK reports a broken body itself)
                raise

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is over {self.max_bytes} bytes", limit=self.max_bytes)
