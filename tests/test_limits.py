"""`sage serve` bounds what clients hold: requests in flight (503 past the limit, probes always answered) and
connections that send nothing, or their headers or body a byte at a time (closed with 408), or huge headers (431).

Each test runs the real server as a subprocess and talks to it over real sockets.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from anyio.abc import SocketStream

from tests.test_serve import Running, scrape, start

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def stop(server: Running) -> None:
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait(10)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[Running]:
    running = start(tmp_path, {"SAGE_MAX_REQUESTS_IN_FLIGHT": "2"})
    yield running
    stop(running)


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[Running]:
    """A server with the shortest timeouts: one second to send anything, headers, or a body."""
    running = start(
        tmp_path,
        {
            "SAGE_IDLE_TIMEOUT_SECONDS": "1",
            "SAGE_HEADER_TIMEOUT_SECONDS": "1",
            "SAGE_BODY_TIMEOUT_SECONDS": "1",
            "SAGE_MAX_HEADER_BYTES": "8192",
            "SAGE_MAX_REQUESTS_IN_FLIGHT": "1",
        },
    )
    yield running
    stop(running)


def error_lines(server: Running) -> list[dict[str, object]]:
    return [line for line in server.log_lines() if line["level"] in ("ERROR", "CRITICAL")]


async def open_stream(stack: AsyncExitStack, http: httpx.AsyncClient, url: str) -> httpx.Response:
    """A legacy SSE stream (GET /sse), held open until `stack` closes."""
    response = await stack.enter_async_context(http.stream("GET", url))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    return response


async def test_requests_past_the_limit_get_503_and_probes_are_still_answered(limited: Running) -> None:
    async with httpx.AsyncClient(timeout=10) as http, AsyncExitStack() as streams:
        assert (await http.get(f"{limited.api}/v1/info")).status_code == 200
        with anyio.fail_after(30):
            # Two open event streams (one per listener) are the two requests in flight this instance allows.
            await open_stream(streams, http, f"{limited.mcp}/sse")
            await open_stream(streams, http, f"{limited.api}/sse")

            refused = await http.get(f"{limited.api}/v1/info")
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
            mcp = await http.post(f"{limited.mcp}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
            assert mcp.status_code == 503

            for base in (limited.api, limited.mcp):
                health = await http.get(f"{base}/health")
                assert health.status_code == 200 and health.json()["status"] == "healthy"
                assert (await http.get(f"{base}/ready")).status_code == 200
            assert (await http.get(f"{limited.metrics}/metrics")).status_code == 200  # scrapes are not limited

        refusals = scrape(limited)[
            ("sage_http_requests_total", (("method", "GET"), ("route", "refused"), ("status", "503")))
        ]
        assert refusals >= 1

    # The streams are closed: once the server has seen them go, requests are served again.
    async with httpx.AsyncClient(timeout=10) as http:
        with anyio.fail_after(30):
            while (answer := await http.get(f"{limited.api}/v1/info")).status_code == 503:
                await anyio.sleep(0.05)
        assert answer.status_code == 200
    assert error_lines(limited) == []


async def connect(base: str) -> SocketStream:
    parts = urlsplit(base)
    assert parts.hostname is not None and parts.port is not None
    return await anyio.connect_tcp(parts.hostname, parts.port)


async def read_until_closed(stream: SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    try:
        async for chunk in stream:
            received += chunk
    except (anyio.BrokenResourceError, ConnectionResetError):
        pass  # closed while we were still writing: what came before is the answer
    return received


async def drip(stream: SocketStream, data: bytes) -> None:
    """Send `data` a byte at a time, a fifth of a second apart, until done or the server closes."""
    try:
        for byte in data:
            await stream.send(bytes([byte]))
            await anyio.sleep(0.2)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionResetError):
        pass


async def answer_to_slow_request(base: str, head: bytes, slow: bytes) -> bytes:
    """Send `head` at once, then `slow` a byte at a time; the server's whole answer once it closes."""
    async with await connect(base) as stream:
        await stream.send(head)
        async with anyio.create_task_group() as tg:
            tg.start_soon(drip, stream, slow)
            answer = await read_until_closed(stream)
            tg.cancel_scope.cancel()
    return answer


@pytest.fixture
async def slow_clients(impatient: Running) -> AsyncIterator[Running]:
    with anyio.fail_after(60):
        yield impatient


async def test_a_connection_that_sends_nothing_is_closed(slow_clients: Running) -> None:
    async with await connect(slow_clients.api) as stream:
        assert await read_until_closed(stream) == b""
    # After a response too: an idle keep-alive connection is closed.
    async with await connect(slow_clients.api) as stream:
        await stream.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 200 ")
    # Stray blank lines start no request and keep nothing open: the drip outlasts the idle time.
    assert await answer_to_slow_request(slow_clients.api, b"", b"\r\n" * 30) == b""


async def test_headers_sent_a_byte_at_a_time_get_408(slow_clients: Running) -> None:
    head = b"GET /v1/info HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"x" * 200 + b"\r\n\r\n"
    answer = await answer_to_slow_request(slow_clients.api, b"", head)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


async def test_a_body_sent_a_byte_at_a_time_gets_408_from_rest_and_mcp(slow_clients: Running) -> None:
    body = json.dumps({"title": "Slow", "layer": "practices", "body": "x" * 200}).encode()
    put = (
        b"PUT /v1/knowledge/slow HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    answer = await answer_to_slow_request(slow_clients.api, put, body)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"request body not received within 1 s" in answer

    ping = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x" * 200}}).encode()
    post = (
        b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\nContent-Length: " + str(len(ping)).encode() + b"\r\n\r\n"
    )
    assert (await answer_to_slow_request(slow_clients.mcp, post, ping)).startswith(b"HTTP/1.1 408 ")

    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{slow_clients.api}/v1/knowledge/slow")).status_code == 404  # nothing half-saved
    assert error_lines(slow_clients) == []


async def test_slow_clients_hold_no_slot_of_the_in_flight_limit(slow_clients: Running) -> None:
    """The limit here is one request in flight: three clients dripping a body do not use it up."""
    put = b"PUT /v1/knowledge/x HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 99\r\n"
    async with AsyncExitStack() as stack:
        for _ in range(3):
            stream = await stack.enter_async_context(await connect(slow_clients.api))
            await stream.send(put + b'\r\n{"ti')
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{slow_clients.api}/v1/info")).status_code == 200


async def test_oversized_headers_get_431(slow_clients: Running) -> None:
    async with await connect(slow_clients.api) as stream:
        await stream.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"x" * 9000 + b"\r\n\r\n")
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 431 ")
    # Streamed in pieces, never completed: refused as soon as it passes the limit.
    async with await connect(slow_clients.api) as stream:
        await stream.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        try:
            for _ in range(100):
                await stream.send(b"X-Padding: " + b"x" * 1000 + b"\r\n")
        except (anyio.BrokenResourceError, ConnectionResetError):
            pass
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert error_lines(slow_clients) == []
