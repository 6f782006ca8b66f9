"""A bare Starlette endpoint under `sage serve`'s uvicorn settings: the floor for an HTTP round trip.

Run as `python -m tests.bench.floor PORT [--sage-bind]`; GET / answers a small JSON document; SIGTERM stops it.

The floor binds its socket with IPPROTO_TCP, as asyncio itself does, so that asyncio turns on TCP_NODELAY for each
accepted connection. With `--sage-bind` it uses sage_server.serve.bind instead, whose socket.socket(family,
SOCK_STREAM) has proto 0: asyncio's _set_nodelay skips such sockets, and every response after the first on a
keep-alive connection then waits ~40 ms for Nagle and the client's delayed ACK. The two floors side by side show it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sage_server.config import load_settings
from sage_server.serve import _config, bind  # the same uvicorn settings and socket setup as `sage serve`

BODY = {"id": "floor", "title": "The floor", "revision": 1}


async def floor(request: Request) -> Response:
    return JSONResponse(BODY)


def create_floor_app() -> Starlette:
    """One route, no middleware: what any HTTP endpoint on this machine costs at least."""
    return Starlette(routes=[Route("/", floor, methods=["GET"])])


def tcp_socket(port: int) -> socket.socket:
    """A listening socket set up like sage_server.serve.bind's, but with the protocol named (see above)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def main(port: int, sage_bind: bool) -> None:
    home = Path.cwd()
    settings = load_settings({"log_level": "WARNING"}, environ={}, cwd=home, home=home).settings
    sock = bind("127.0.0.1", port, "the floor's PORT argument") if sage_bind else tcp_socket(port)
    await uvicorn.Server(_config(create_floor_app(), settings)).serve([sock])


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]), "--sage-bind" in sys.argv[2:])
