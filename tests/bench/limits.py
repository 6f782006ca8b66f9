"""Bounded resources and shutdown against a real `sage serve`: RSS after thousands of abandoned MCP sessions,
/health latency while thousands of idle sockets are held, how soon idle and slow sockets are closed, and how long
shutdown takes (idle, with event streams attached, and `sage mcp` over stdio)."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
from anyio.abc import SocketStream

from tests.bench.load import Latency, summarize
from tests.bench.report import Target, section_json, section_table
from tests.bench.servers import Running, memory_mb, sage_env, start_sage, stop

ACCEPT = {"Accept": "application/json, text/event-stream"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "gone", "version": "1"}},
}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Sizes:
    """How much of everything: the full run, or a smoke run (--quick)."""

    sessions: int
    held_sockets: int
    closed_sockets: int
    health_requests: int
    streams: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        return cls(60, 100, 20, 20, 4) if quick else cls(5000, 5000, 1000, 500, 50)


@dataclass
class LimitResults:
    """What the resource and shutdown measurements found."""

    latencies: dict[str, Latency] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def targets(r: LimitResults) -> list[Target]:
    """The issue's goals: RSS bounded under abandoned sessions, clean and prompt shutdowns."""
    f = r.figures.get
    return [
        Target("RSS growth after the abandoned 2025-11-25 MCP sessions", f("sessions_rss_growth_mb"), 50, "MB"),
        Target("MCP sessions still alive afterwards (cap 500 per listener)", f("sessions_alive"), 500, ""),
        Target("shutdown with event streams attached", f("shutdown_streams_s"), 2.0, "s"),
        Target("shutdowns that did not exit 0", f("shutdown_bad_exits"), 0, ""),
        Target("ERROR lines logged by the measured servers", f("error_lines"), 0, ""),
    ]


FIGURES = {
    "sessions_opened": "abandoned MCP sessions opened (initialize + initialized, then nothing)",
    "sessions_per_s": "... opened per second",
    "sessions_rss_start_mb": "... server RSS before (MB)",
    "sessions_rss_after_mb": "... server RSS after (MB)",
    "sessions_rss_growth_mb": "... RSS growth (MB)",
    "sessions_alive": "... sessions still alive at the end",
    "held_sockets": "idle sockets held open during the /health run (half silent, half mid-headers)",
    "held_sockets_closed_early": "... of them closed by the server meanwhile (timeouts raised to 120 s)",
    "idle_timeout_s": "idle_timeout_seconds of the closing run (5 by default; 1 with --quick)",
    "idle_closed": "... silent sockets closed by the server",
    "idle_close_s": "... after connecting (s, median)",
    "header_timeout_s": "header_timeout_seconds of the closing run (10 by default; 2 with --quick)",
    "slow_headers_closed": "... sockets sending half their headers, closed with 408",
    "slow_headers_close_s": "... after connecting (s, median)",
    "shutdown_idle_s": "SIGTERM to exit, idle server (s)",
    "shutdown_streams_s": "SIGTERM to exit, event streams attached (s; grace period 10 s)",
    "shutdown_streams_attached": "... streams attached (legacy SSE and MCP standalone streams)",
    "shutdown_stdio_sigint_s": "SIGINT to exit, sage mcp over stdio (s)",
    "shutdown_stdio_sigterm_s": "SIGTERM to exit, sage mcp over stdio (s)",
    "shutdown_bad_exits": "shutdowns that did not exit 0",
    "error_lines": "ERROR lines in the measured servers' logs",
}


async def measure(work: Path, quick: bool, progress: Progress) -> LimitResults:
    """Every resource and shutdown measurement, each on its own server under `work`."""
    sizes = Sizes.of(quick)
    results = LimitResults()
    raise_own_file_limit(2 * sizes.held_sockets + 256)
    results.figures["error_lines"] = 0
    results.figures["shutdown_bad_exits"] = 0
    progress(f"resources: {sizes.sessions} abandoned MCP sessions")
    await _sessions(work, sizes, results)
    progress(f"resources: /health while {sizes.held_sockets} idle sockets are held")
    await _held_sockets(work, sizes, results)
    progress("resources: idle and slow sockets closed by the server")
    await _closing(work, sizes, quick, results)
    progress("resources: shutdown times")
    await _shutdowns(work, sizes, results)
    return results


def raise_own_file_limit(wanted: int) -> None:
    """Let the benchmark itself hold thousands of sockets (the usual soft limit is 1024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


def _server(work: Path, name: str, settings: dict[str, str] | None = None) -> Running:
    home = work / name
    home.mkdir(parents=True, exist_ok=True)
    return start_sage(home, home / "sage.db", home / "cache", ready_within=120, settings=settings)


def _finish(running: Running, results: LimitResults) -> None:
    """Stop the server and count what it logged at ERROR."""
    if stop(running.process) != 0:
        results.figures["shutdown_bad_exits"] += 1
        results.notes.append(f"server exited with {running.process.returncode}: {running.stderr_tail(500)}")
    results.figures["error_lines"] += _errors(running.stderr_path)


def _errors(path: Path) -> int:
    count = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            count += json.loads(line).get("level") in ("ERROR", "CRITICAL")
        except (json.JSONDecodeError, AttributeError):
            count += "Traceback" in line
    return count


async def _gather(count: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> None:
    """`call(0..count-1)`, `concurrency` at a time."""
    limiter = anyio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with limiter:
            await call(index)

    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(one, index)


# ---- sessions


async def _open_session(http: httpx.AsyncClient, url: str = "/mcp") -> str:
    """Open a 2025-11-25 session as a client does (initialize, initialized) and return its id."""
    opened = await http.post(url, json=INITIALIZE, headers=ACCEPT)
    opened.raise_for_status()
    session_id = opened.headers["mcp-session-id"]
    headers = {**ACCEPT, "mcp-session-id": session_id, "mcp-protocol-version": "2025-11-25"}
    (
        await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    ).raise_for_status()
    return session_id


async def _sessions(work: Path, sizes: Sizes, results: LimitResults) -> None:
    running = _server(work, "sessions")
    try:
        async with httpx.AsyncClient(base_url=running.mcp, timeout=30) as http:
            for _ in range(20):  # warm up: the code paths are loaded before the baseline is taken
                session = await _open_session(http)
                await http.delete("/mcp", headers={"mcp-session-id": session, "mcp-protocol-version": "2025-11-25"})
            before = memory_mb(running.process.pid)["rss_mb"]
            ids: list[str] = []

            async def abandon(_: int) -> None:
                ids.append(await _open_session(http))

            started = time.perf_counter()
            with anyio.fail_after(600):
                await _gather(sizes.sessions, 8, abandon)
            elapsed = time.perf_counter() - started
            after = memory_mb(running.process.pid)["rss_mb"]
            alive = 0

            async def ping(index: int) -> None:
                nonlocal alive
                headers = {**ACCEPT, "mcp-session-id": ids[index], "mcp-protocol-version": "2025-11-25"}
                answer = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, headers=headers)
                alive += answer.status_code == 200

            await _gather(len(ids), 8, ping)
        results.figures.update(
            sessions_opened=len(ids),
            sessions_per_s=round(len(ids) / elapsed, 1),
            sessions_rss_start_mb=before,
            sessions_rss_after_mb=after,
            sessions_rss_growth_mb=round(after - before, 1),
            sessions_alive=alive,
        )
    finally:
        _finish(running, results)


# ---- idle sockets


async def _connect(base: str) -> SocketStream:
    parts = urlsplit(base)
    assert parts.hostname is not None and parts.port is not None
    return await anyio.connect_tcp(parts.hostname, parts.port)


async def _hold(stack: AsyncExitStack, base: str, count: int) -> list[SocketStream]:
    """Open `count` connections: half send nothing, half the start of a request they never finish."""
    held: list[SocketStream] = []

    async def open_one(index: int) -> None:
        stream = await stack.enter_async_context(await _connect(base))
        if index % 2:
            await stream.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        held.append(stream)

    await _gather(count, 200, open_one)
    return held


async def _health_latency(base: str, requests: int) -> Latency:
    samples: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        started = time.perf_counter()
        for _ in range(requests):
            began = time.perf_counter()
            answer = await http.get("/health")
            if answer.status_code == 200:
                samples.append(time.perf_counter() - began)
            else:
                errors += 1
        return summarize(samples, time.perf_counter() - started, errors=errors)


async def _still_open(stream: SocketStream) -> bool:
    with anyio.move_on_after(0.001):
        try:
            await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
            return False
        return False  # the server answered something: not idle any more
    return True


async def _held_sockets(work: Path, sizes: Sizes, results: LimitResults) -> None:
    patient = {"SAGE_IDLE_TIMEOUT_SECONDS": "120", "SAGE_HEADER_TIMEOUT_SECONDS": "120"}
    running = _server(work, "held", patient)
    try:
        results.latencies["health/c1, no other sockets"] = await _health_latency(running.api, sizes.health_requests)
        async with AsyncExitStack() as stack:
            with anyio.fail_after(300):
                held = await _hold(stack, running.api, sizes.held_sockets)
            name = f"health/c1, {sizes.held_sockets} idle sockets held"
            results.latencies[name] = await _health_latency(running.api, sizes.health_requests)
            open_now = [await _still_open(stream) for stream in held]
            results.figures["held_sockets"] = len(held)
            results.figures["held_sockets_closed_early"] = len(held) - sum(open_now)
    finally:
        _finish(running, results)


async def _closing(work: Path, sizes: Sizes, quick: bool, results: LimitResults) -> None:
    # Quick runs shorten the timeouts so the smoke test does not wait ten seconds; full runs use the defaults.
    idle, header = (1, 2) if quick else (5, 10)
    settings = {"SAGE_IDLE_TIMEOUT_SECONDS": str(idle), "SAGE_HEADER_TIMEOUT_SECONDS": str(header)}
    results.figures.update(idle_timeout_s=idle, header_timeout_s=header)
    running = _server(work, "closing", settings)
    closed: dict[str, list[float]] = {"idle": [], "slow_headers": []}
    try:
        async with AsyncExitStack() as stack:

            async def watch(index: int) -> None:
                began = time.perf_counter()  # before connecting: the server's clock starts when it accepts
                stream = await stack.enter_async_context(await _connect(running.api))
                kind = "slow_headers" if index % 2 else "idle"
                if kind == "slow_headers":
                    await stream.send(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
                try:
                    while await stream.receive():
                        pass  # the 408 sent to a slow client
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                    closed[kind].append(time.perf_counter() - began)

            with anyio.move_on_after(60):
                await _gather(sizes.closed_sockets * 2, sizes.closed_sockets * 2, watch)
        for kind, times in closed.items():
            results.figures[f"{kind}_closed"] = len(times)
            results.figures[f"{kind}_close_s"] = round(statistics.median(times), 2) if times else float("nan")
    finally:
        _finish(running, results)


# ---- shutdown


async def _exit_seconds(process: subprocess.Popen[Any], signum: signal.Signals) -> tuple[float, int]:
    began = time.perf_counter()
    process.send_signal(signum)
    code: int = await anyio.to_thread.run_sync(process.wait, 60)
    return round(time.perf_counter() - began, 3), code


async def _shutdowns(work: Path, sizes: Sizes, results: LimitResults) -> None:
    running = _server(work, "shutdown-idle")
    seconds, code = await _exit_seconds(running.process, signal.SIGTERM)
    results.figures["shutdown_idle_s"] = seconds
    results.figures["shutdown_bad_exits"] += code != 0
    results.figures["error_lines"] += _errors(running.stderr_path)

    running = _server(work, "shutdown-streams")
    try:
        async with httpx.AsyncClient(timeout=30) as http, AsyncExitStack() as stack:
            for index in range(sizes.streams):
                if index % 2:
                    base = running.mcp if index % 4 == 1 else running.api
                    session = await _open_session(http, f"{base}/mcp")
                    headers = {**ACCEPT, "mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
                    await stack.enter_async_context(http.stream("GET", f"{base}/mcp", headers=headers))
                else:
                    await stack.enter_async_context(http.stream("GET", f"{running.mcp}/sse"))
            seconds, code = await _exit_seconds(running.process, signal.SIGTERM)
        results.figures["shutdown_streams_s"] = seconds
        results.figures["shutdown_streams_attached"] = sizes.streams
        results.figures["shutdown_bad_exits"] += code != 0
        results.figures["error_lines"] += _errors(running.stderr_path)
    finally:
        stop(running.process)

    for signum in (signal.SIGINT, signal.SIGTERM):
        seconds, code = await _stdio_exit(work, signum)
        results.figures[f"shutdown_stdio_{signum.name.lower()}_s"] = seconds
        results.figures["shutdown_bad_exits"] += code != 0


async def _stdio_exit(work: Path, signum: signal.Signals) -> tuple[float, int]:
    home = work / f"stdio-{signum.name}"
    home.mkdir(parents=True, exist_ok=True)
    env = sage_env(home, home / "sage.db", home / "cache")
    process = subprocess.Popen(
        [sys.executable, "-m", "sage_server", "mcp"],
        cwd=home,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write((json.dumps(INITIALIZE) + "\n").encode())
        process.stdin.flush()
        with anyio.fail_after(60):
            await anyio.to_thread.run_sync(process.stdout.readline, abandon_on_cancel=True)
        return await _exit_seconds(process, signum)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdin.close()
        process.stdout.close()


# ---- report


def table(r: LimitResults) -> str:
    """The resources section of the printed table."""
    return section_table("resources", r.latencies, r.figures, FIGURES, targets(r), r.notes)


def to_json(r: LimitResults) -> dict[str, Any]:
    return section_json(r.latencies, r.figures, targets(r), r.notes)
