"""An app served the way `sage serve` serves each listener: real uvicorn with serve.py's own config (our protocol
class, the trusted-proxy rule, TLS), on a free localhost port, in this process."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.types import ASGIApp

from sage_server import serve
from sage_server.config import Settings


@asynccontextmanager
async def listening(app: ASGIApp, settings: Settings, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """Serve `app` until the block ends; yields its base URL."""
    sock = serve.bind("127.0.0.1", 0, "a free port")
    port = sock.getsockname()[1]
    server = serve._Server(serve._config(app, settings, tls))  # the listener's own config, private to serve.py
    stopped = anyio.Event()

    async def run() -> None:
        try:
            await server.serve([sock])
        finally:
            stopped.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(20):  # uvicorn has no startup event to wait on: poll its flag, bounded
                while not server.started:
                    assert not stopped.is_set(), "uvicorn stopped during startup (see the log)"
                    await anyio.sleep(0.02)
            try:
                yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
            finally:
                server.should_exit = True
                with anyio.fail_after(20):
                    await stopped.wait()
    finally:
        sock.close()
