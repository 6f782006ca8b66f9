"""`sage serve`: one asyncio process, three uvicorn listeners in one anyio task group, one shared service."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from typing import Literal

import anyio
import anyio.to_thread
import uvicorn
from starlette.types import ASGIApp

from sage_server.app import create_app, create_mcp_app, create_metrics_app
from sage_server.auth import Authenticator, ensure_admin_key
from sage_server.config import Settings
from sage_server.connections import ConnectionLimits, guarded_protocol
from sage_server.errors import ConfigError
from sage_server.limits import RequestGate
from sage_server.logs import get_logger, log_event
from sage_server.ratelimit import RateLimiter
from sage_server.schedule import BackupSchedule
from sage_server.service import KnowledgeService
from sage_server.signals import StopSignals

log = get_logger("serve")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to us: uvicorn's own handler re-raises the signal after shutdown,
    which would kill the process instead of letting it exit 0, and three servers would fight over it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Bound glibc's malloc arenas before any thread starts. glibc gives threads (one per SQLite connection, the
    worker threads of the disk cache) arenas of their own, which keep the large transient buffers of big queries:
    at 100k documents the server's peak RSS was 475 MB with the default and about 232 MB with two arenas."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass  # not glibc (musl, say): nothing to bound


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). An import frees what it parsed when it
    ends, but glibc keeps freed memory for reuse: after importing 100k documents at start the server stayed at
    850 MB though it no longer held them."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


OPEN_FILES_CEILING = 65_536


def raise_open_file_limit() -> None:
    """Let the process hold as many sockets as the system allows it (the soft limit up to the hard one, capped):
    with the usual soft limit of 1024, a few hundred idle clients would use up the descriptors and new
    connections, probes included, would be refused before any of our limits could act."""
    try:
        import resource
    except ImportError:
        return  # Windows: no such limit to raise
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_CEILING)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def bind(host: str, port: int, setting: str) -> socket.socket:
    """Bind a listening socket, or stop with an error naming the port and the setting that chose it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on connections whose socket says TCP,
    # and proto 0 would leave every small response waiting ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise ConfigError(f"port {port} on {host} {reason}; choose another with {setting}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context every listener serves with, when SAGE_TLS_CERT_FILE is set: TLS 1.2 at least. A certificate
    or key that cannot be loaded stops the server with an error naming the file, before any port is bound."""
    if settings.tls_cert_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    files = f"{settings.tls_cert_file}" + (f" and {settings.tls_key_file}" if settings.tls_key_file else "")
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except ssl.SSLError as exc:  # before OSError, of which it is one
        raise ConfigError(
            f"SAGE_TLS_CERT_FILE/SAGE_TLS_KEY_FILE: {files} do not hold a PEM certificate and its private key "
            f"({exc.reason or exc})"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"SAGE_TLS_CERT_FILE/SAGE_TLS_KEY_FILE: cannot read {exc.filename or files}: {exc.strerror}"
        ) from exc
    return context


def _config(app: ASGIApp, settings: Settings, tls: ssl.SSLContext | None = None) -> uvicorn.Config:
    # log_config=None keeps uvicorn's loggers on our JSON handler; our middleware writes the access log.
    # Forwarded headers: uvicorn believes X-Forwarded-For from 127.0.0.1 by default (FORWARDED_ALLOW_IPS), which let
    # any local process, or a proxy passing the header through, choose its client address. Here only the proxies in
    # SAGE_TRUSTED_PROXIES are believed (none by default), so the address every limit, log line and audit entry uses
    # is the peer's, or what a trusted proxy says the peer was.
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        http=guarded_protocol(ConnectionLimits.from_settings(settings)),
        timeout_keep_alive=settings.idle_timeout_seconds,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        log_level=settings.log_level.lower(),
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies),
        # uvicorn serves TLS when given a context factory; ours was built (and its files checked) before binding.
        ssl_context_factory=(lambda config, default: tls) if tls is not None else None,
    )


Listener = Literal["api", "mcp", "metrics"]
SETTINGS_OF = {
    "api": ("api_port", "SAGE_API_PORT or --port"),
    "mcp": ("mcp_port", "SAGE_MCP_PORT or --mcp-port"),
    "metrics": ("metrics_port", "SAGE_METRICS_PORT or --metrics-port"),
}


async def serve(settings: Settings, listeners: tuple[Listener, ...] = ("api", "mcp", "metrics")) -> None:
    """Run the listeners (API, MCP, metrics by default) until SIGTERM or SIGINT, then shut down cleanly."""
    tls = tls_context(settings)
    sockets: list[socket.socket] = []
    try:
        for name in listeners:
            field, setting = SETTINGS_OF[name]
            # Metrics carry no credential check: their listener stays on loopback unless SAGE_METRICS_HOST says.
            host = settings.metrics_host if name == "metrics" else settings.host
            sockets.append(bind(host, getattr(settings, field), setting))
    except ConfigError:
        for sock in sockets:
            sock.close()
        raise

    raise_open_file_limit()
    # Caught from here on: a signal during startup is acted on once serving begins, never a kill mid-start.
    with StopSignals() as signals:
        await _serve(settings, listeners, sockets, signals, tls)


async def _serve(
    settings: Settings,
    listeners: tuple[Listener, ...],
    sockets: list[socket.socket],
    signals: StopSignals,
    tls: ssl.SSLContext | None,
) -> None:
    service = KnowledgeService(settings)
    await service.start(import_now=False, fallback=True)
    try:
        # Secure by default: beyond loopback, HTTP needs a credential (named keys in the database count).
        await service.key_source.refresh()
        ensure_admin_key(settings, stored_keys=service.key_source.active)
    except BaseException:
        await service.close()
        raise
    rule = Authenticator.from_settings(settings, service.key_source).describe()
    log_event(log, logging.INFO, "Authentication", operation="auth", rule=rule)
    # One gate for the API and MCP listeners: the in-flight limit is per instance. Metrics scrapes are not limited.
    gate = RequestGate(
        settings.max_requests_in_flight,
        on_reject=lambda method, status: service.metrics.http_request("refused", method, status, 0.0),
    )
    # One rate limiter too: a caller's limit is the same whichever listener it calls.
    limiter = (
        RateLimiter.from_settings(settings, on_breaker=service.metrics.breaker_state)
        if settings.rate_limit_per_minute
        else None
    )
    factories: dict[Listener, Callable[[], ASGIApp]] = {
        "api": lambda: gate.wrap(create_app(settings, service, limiter)),
        "mcp": lambda: gate.wrap(create_mcp_app(settings, service, limiter)),
        "metrics": lambda: create_metrics_app(service),
    }
    apps = [factories[name]() for name in listeners]
    servers = [_Server(_config(app, settings, tls)) for app in apps]
    try:
        background = anyio.CancelScope()  # cancelled at shutdown: an import in progress rolls back whole

        async def import_then_trim() -> None:
            await service.import_configured()
            release_freed_memory()

        async def in_background() -> None:
            with background:
                async with anyio.create_task_group() as work:
                    work.start_soon(import_then_trim)
                    if settings.backup_interval_hours > 0 and service.fallback_reason is None:
                        work.start_soon(BackupSchedule(settings, service).run)

        async def stop_on_signal() -> None:
            signum = await signals.wait()
            log_event(log, logging.INFO, "Shutting down", operation="serve", signal=signum.name)
            background.cancel()
            # Event streams end now (they never finish by themselves); other requests in flight get
            # shutdown_grace_seconds to finish while the servers stop accepting, then the servers return.
            gate.close()
            for server in servers:
                server.should_exit = True
            while True:  # still caught, so that a second signal cannot kill the process halfway through closing
                signum = await signals.wait()
                log_event(log, logging.INFO, "Already shutting down", operation="serve", signal=signum.name)

        async with anyio.create_task_group() as watching:
            watching.start_soon(stop_on_signal)
            async with anyio.create_task_group() as tg:
                for server, sock in zip(servers, sockets, strict=True):
                    tg.start_soon(server.serve, [sock])
                tg.start_soon(in_background)
                ports = {name: sock.getsockname()[1] for name, sock in zip(listeners, sockets, strict=True)}
                scheme = "https" if tls is not None else "http"
                log_event(log, logging.INFO, "Serving", operation="serve", host=settings.host, scheme=scheme, **ports)
            watching.cancel_scope.cancel()
    finally:
        if limiter is not None:
            await limiter.aclose()
        await service.close()
        log_event(log, logging.INFO, "Stopped", operation="serve")
