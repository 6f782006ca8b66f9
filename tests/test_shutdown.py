"""Clean shutdown: `sage serve` ends open event streams at SIGTERM and exits 0 without waiting out its grace
period or logging errors; `sage mcp` over stdio exits 0 on SIGINT (Ctrl-C) and SIGTERM; and where the event loop
cannot catch signals (Windows), plain signal handlers stand in."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from sage_server.serve import serve
from sage_server.signals import StopSignals
from tests.conftest import make_settings, sage_env
from tests.ports import free_port
from tests.test_serve import start

pytestmark = pytest.mark.anyio

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
ACCEPT = {"Accept": "application/json, text/event-stream"}


def errors_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.strip() and json.loads(line)["level"] in ("ERROR", "CRITICAL")]


async def wait_exit(process: subprocess.Popen[Any], seconds: float) -> int:
    code: int = await anyio.to_thread.run_sync(process.wait, seconds)
    return code


@pytest.mark.e2e
async def test_sigterm_ends_event_streams_and_exits_zero_before_the_grace_period(tmp_path: Path) -> None:
    # A grace period far longer than the test waits: open streams must not hold the server for it.
    server = start(tmp_path, {"SAGE_SHUTDOWN_GRACE_SECONDS": "120"})
    try:
        async with httpx.AsyncClient(timeout=30) as http, AsyncExitStack() as stack:
            # A legacy SSE client on the MCP port, and a 2025-11-25 session's event stream on the API port.
            sse = await stack.enter_async_context(http.stream("GET", f"{server.mcp}/sse"))
            events = sse.aiter_lines()
            assert (await anext(events)) == "event: endpoint"
            opened = await http.post(f"{server.api}/mcp", json=INITIALIZE, headers=ACCEPT)
            session = {
                **ACCEPT,
                "mcp-session-id": opened.headers["mcp-session-id"],
                "mcp-protocol-version": "2025-11-25",
            }
            await http.post(
                f"{server.api}/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session
            )
            standalone = await stack.enter_async_context(http.stream("GET", f"{server.api}/mcp", headers=session))
            assert standalone.headers["content-type"].startswith("text/event-stream")

            server.process.send_signal(signal.SIGTERM)
            with anyio.fail_after(60):
                # Both streams end cleanly (a proper end of the chunked body, not a broken connection).
                async for _ in events:
                    pass
                async for _ in standalone.aiter_bytes():
                    pass
                assert await wait_exit(server.process, 60) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)
    log = server.stderr_path.read_text()
    assert errors_in(log) == []
    messages = [line["message"] for line in server.log_lines()]
    assert "Shutting down" in messages and messages[-1] == "Stopped"


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_sage_mcp_over_stdio_exits_zero_on_a_signal(tmp_path: Path, signum: signal.Signals) -> None:
    env = sage_env(tmp_path, SAGE_DB_PATH=str(tmp_path / "stdio.db"), SAGE_BUNDLED_KNOWLEDGE="false")
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "sage_server", "mcp"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write((json.dumps(INITIALIZE) + "\n").encode())
        process.stdin.flush()
        with anyio.fail_after(60):
            reply = await anyio.to_thread.run_sync(process.stdout.readline, abandon_on_cancel=True)
        assert json.loads(reply)["result"]["serverInfo"]["name"] == "sage"
        # stdin stays open: the server is waiting for the client's next line when the signal comes.
        process.send_signal(signum)
        assert await wait_exit(process, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdin.close()
        process.stdout.close()
    log = stderr_path.read_text()
    assert errors_in(log) == [] and "Traceback" not in log
    assert any(json.loads(line)["message"] == "Shutting down" for line in log.splitlines() if line.strip())


@pytest.fixture
def no_loop_signals(monkeypatch: pytest.MonkeyPatch) -> None:
    """The event loop as on Windows: add_signal_handler raises NotImplementedError."""

    def missing(self: asyncio.AbstractEventLoop, sig: int, callback: Any, *args: Any) -> None:
        raise NotImplementedError

    loop = asyncio.get_event_loop_policy().new_event_loop()
    monkeypatch.setattr(type(loop), "add_signal_handler", missing)
    loop.close()


async def test_stop_signals_fall_back_to_signal_handlers_where_the_loop_has_none(no_loop_signals: None) -> None:
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        assert signals.fallback
        os.kill(os.getpid(), signal.SIGINT)
        with anyio.fail_after(10):
            assert await signals.wait() == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


async def test_sage_serve_stops_on_sigterm_where_the_loop_cannot_catch_signals(
    tmp_path: Path, no_loop_signals: None
) -> None:
    ports = {"api_port": free_port(), "mcp_port": free_port(), "metrics_port": free_port()}
    settings = make_settings(tmp_path, backup_interval_hours=0, **ports)
    before = signal.getsignal(signal.SIGTERM)
    stopped = anyio.Event()

    async def run() -> None:
        try:
            await serve(settings)
        finally:
            stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(60):
            async with httpx.AsyncClient(timeout=5) as http:
                while True:
                    assert not stopped.is_set(), "sage serve stopped before it was ready"
                    try:
                        if (await http.get(f"http://127.0.0.1:{ports['api_port']}/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.05)
            # Only once our handler is in place may the signal be sent: by default SIGTERM ends the test run.
            assert "StopSignals" in getattr(signal.getsignal(signal.SIGTERM), "__qualname__", "")
            os.kill(os.getpid(), signal.SIGTERM)
            await stopped.wait()
    assert signal.getsignal(signal.SIGTERM) is before
