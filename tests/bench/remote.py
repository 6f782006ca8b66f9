"""Over the wire: `sage serve` cold start, REST and MCP latencies, the bare-Starlette floor, writes, and memory."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
from mcp import Client

from tests.bench.corpus import Corpus, QueryStream
from tests.bench.inprocess import Picks
from tests.bench.load import CONCURRENCY, Budget, run_load, summarize
from tests.bench.report import Results
from tests.bench.servers import Running, memory_mb, start_floor, start_sage, stop

WRITE_LEVELS = (1, 8, CONCURRENCY)
Doc = tuple[str, str, dict[str, Any]]  # document id, its unique token, the tool's arguments


class RequestFailed(Exception):
    """A request answered, but not with what the benchmark asked for."""


@asynccontextmanager
async def http_clients(base: str, count: int = CONCURRENCY) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One keep-alive client per worker, as separate scripts would be: a single AsyncClient shared by 32 tasks
    spends more time in its own connection pool than the server spends answering (466 vs 1278 req/s measured
    against the floor), and would make the load generator the thing measured."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30.0)) for _ in range(count)]


async def _ok(response: httpx.Response) -> httpx.Response:
    if response.status_code != 200:
        raise RequestFailed(f"{response.request.url.path}: HTTP {response.status_code} {response.text[:200]}")
    return response


async def _tool(client: Client, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    result = await client.call_tool(name, arguments)
    content: dict[str, Any] | None = result.structured_content
    if result.is_error or content is None:
        raise RequestFailed(f"{name}: {result.content}"[:300])
    return content


@asynccontextmanager
async def mcp_clients(url: str, count: int) -> AsyncIterator[list[Client]]:
    """`count` MCP sessions over streamable HTTP, one per concurrent worker, as that many assistants would hold."""
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(url)) for _ in range(count)]
        yield clients


async def _rest(running: Running, stream: QueryStream, picks: Picks, budget: Budget, results: Results) -> None:
    ids = picks.warm
    work = stream.workload(budget.warmup, budget.serial, budget.concurrent)
    async with http_clients(running.api) as clients:
        for q in work.warmup:
            await _ok(await clients[0].get("/v1/search", params={"q": q}))
        for doc_id in ids:  # the get pool is read warm: the server has answered each id once already
            await _ok(await clients[0].get(f"/v1/knowledge/{doc_id}"))
        for name, concurrency, queries, tasks in (
            ("c1", 1, work.serial, work.serial_tasks),
            ("c32", CONCURRENCY, work.concurrent, work.concurrent_tasks),
        ):

            async def find(w: int, i: int, queries: list[str] = queries) -> object:
                return await _ok(await clients[w].get("/v1/search", params={"q": queries[i]}))

            async def read(w: int, i: int) -> object:
                return await _ok(await clients[w].get(f"/v1/knowledge/{ids[i % len(ids)]}"))

            async def pack(w: int, i: int, tasks: list[str] = tasks) -> object:
                return (await _ok(await clients[w].get("/v1/context", params={"task": tasks[i]}))).json()

            for op, call in (("search", find), ("get", read), ("context", pack)):
                results.latencies[f"rest/{op}/{name}"] = await run_load(
                    call, concurrency=concurrency, count=len(queries), seconds=budget.seconds
                )


async def _under_search(running: Running, queries: list[str], picks: Picks, budget: Budget, results: Results) -> None:
    """/health and a warm get, one at a time from a client of their own, while 32 workers search: what a probe and
    a cheap read wait for when the server is busy ranking (the searches are measured too)."""
    ids = picks.warm
    searching = anyio.Event()
    async with http_clients(running.api, CONCURRENCY + 1) as clients:
        prober = clients[CONCURRENCY]

        async def find(w: int, i: int) -> object:
            return await _ok(await clients[w].get("/v1/search", params={"q": queries[i]}))

        async def searches() -> None:
            results.latencies["rest/search-loaded/c32"] = await run_load(
                find, concurrency=CONCURRENCY, count=len(queries), seconds=budget.seconds
            )
            searching.set()

        samples: dict[str, list[float]] = {"health": [], "get": []}

        async def probes() -> None:
            i = 0
            while not searching.is_set() or i < 2:  # one of each at least, however quick the searches
                started = time.perf_counter()
                response = await prober.get("/health" if i % 2 == 0 else f"/v1/knowledge/{ids[(i // 2) % len(ids)]}")
                if response.status_code == 200:
                    samples["health" if i % 2 == 0 else "get"].append(time.perf_counter() - started)
                i += 1

        async with anyio.create_task_group() as group:
            group.start_soon(searches)
            group.start_soon(probes)
    seconds = results.latencies["rest/search-loaded/c32"].seconds
    for name, taken in samples.items():
        results.latencies[f"rest/{name}-under-32-searches/c1"] = summarize(taken, seconds)


async def _mcp(clients: list[Client], stream: QueryStream, picks: Picks, budget: Budget, results: Results) -> None:
    ids = picks.warm
    # The stream's next workload: as long as REST's, and none of its queries, which the server has cached.
    work = stream.workload(budget.warmup, budget.serial, budget.concurrent)
    for q in work.warmup:
        await _tool(clients[0], "sage_search", {"query": q})
    for name, concurrency, queries, tasks in (
        ("c1", 1, work.serial, work.serial_tasks),
        ("c32", CONCURRENCY, work.concurrent, work.concurrent_tasks),
    ):

        async def find(w: int, i: int, queries: list[str] = queries) -> object:
            return await _tool(clients[w], "sage_search", {"query": queries[i]})

        async def read(w: int, i: int) -> object:
            return await _tool(clients[w], "sage_get_document", {"id": ids[i % len(ids)]})

        async def pack(w: int, i: int, tasks: list[str] = tasks) -> object:
            return await _tool(clients[w], "sage_get_context", {"task": tasks[i]})

        for op, call in (("search", find), ("get", read), ("context", pack)):
            results.latencies[f"mcp/{op}/{name}"] = await run_load(
                call, concurrency=concurrency, count=len(queries), seconds=budget.seconds
            )


async def _floor(work: Path, budget: Budget, results: Results) -> None:
    """The bare-Starlette floor at both concurrencies, and once more at c1 bound the way `sage serve` binds."""
    for variant, levels in (
        ("floor", ((1, budget.serial), (CONCURRENCY, budget.concurrent))),
        ("floor-sage-bind", ((1, budget.serial),)),
    ):
        floor = start_floor(work, sage_bind=variant == "floor-sage-bind")
        try:
            async with http_clients(floor.api) as clients:

                async def hit(w: int, i: int) -> object:
                    return await _ok(await clients[w].get("/"))

                for _ in range(budget.warmup):
                    await hit(0, 0)
                for concurrency, count in levels:
                    results.latencies[f"{variant}/get/c{concurrency}"] = await run_load(
                        hit, concurrency=concurrency, count=count, seconds=budget.seconds
                    )
        finally:
            stop(floor.process)


def _write_body(stream: QueryStream, token: str) -> str:
    vocab, rng = stream.vocabulary, stream.rng
    paragraphs = [" ".join(vocab.sentence(rng, rng.randint(8, 20)) for _ in range(5)) for _ in range(3)]
    return f"# Bench note {token}\n\n{paragraphs[0]} {token}.\n\n## Details\n\n{paragraphs[1]}\n\n{paragraphs[2]}\n"


@dataclass
class Visibility:
    """Writes searched for by their unique token after the acknowledgement, and those search did not find."""

    checked: int = 0
    failures: int = 0
    read_your_write: int = 0  # of `checked`, searched for by the writer itself the moment its write returned
    first_failure: str | None = None

    async def check(self, client: httpx.AsyncClient, doc_id: str, token: str) -> None:
        response = await client.get("/v1/search", params={"q": token})
        found = response.json().get("hits", []) if response.status_code == 200 else []
        self.checked += 1
        if doc_id not in [hit["id"] for hit in found]:
            self.failures += 1
            self.first_failure = self.first_failure or f"{doc_id}: HTTP {response.status_code} {response.text[:300]}"


async def _writes(
    clients: list[Client], api: str, stream: QueryStream, seed: int, budget: Budget, results: Results
) -> None:
    """sage_save_knowledge at each concurrency, timed on writes alone; then the visibility of every write.

    Per level: (1) the timed pass, writers only: what the write target is judged on; (2) every write of that pass
    is searched for by its unique token; (3) a shorter read-your-write pass where each writer searches for its
    write the moment it is acknowledged. Searches run beside the timed writes would halve the write rate measured
    (one event loop serves both), so the strict check has its own pass.
    """
    seen = Visibility()

    def document(level: int, i: int) -> tuple[str, str, dict[str, Any]]:
        doc_id, token = f"bench-write-c{level}-{i}", f"benchtok{seed}c{level}n{i}"
        body = _write_body(stream, token)
        return doc_id, token, {"id": doc_id, "title": f"Bench note {i}", "body": body, "layer": "practices"}

    async with http_clients(api) as http:
        for level in WRITE_LEVELS:
            count = budget.writes[level]
            timed = [document(level, i) for i in range(count)]
            strict = [document(level, count + i) for i in range(max(level, count // 4))]
            acknowledged: list[int] = []

            async def write(w: int, i: int, timed: list[Doc] = timed, done: list[int] = acknowledged) -> object:
                saved = await _tool(clients[w], "sage_save_knowledge", timed[i][2])
                done.append(i)
                return saved

            async def verify(w: int, i: int, timed: list[Doc] = timed, done: list[int] = acknowledged) -> None:
                doc_id, token, _ = timed[done[i]]
                await seen.check(http[w], doc_id, token)

            async def write_then_read(w: int, i: int, strict: list[Doc] = strict) -> None:
                doc_id, token, arguments = strict[i]
                await _tool(clients[w], "sage_save_knowledge", arguments)
                seen.read_your_write += 1
                await seen.check(http[w], doc_id, token)

            results.latencies[f"mcp/write/c{level}"] = await run_load(
                write, concurrency=level, count=count, seconds=budget.seconds
            )
            for name, loop in (
                ("verifying searches", await run_load(verify, concurrency=level, count=len(acknowledged), seconds=60)),
                ("read-your-write", await run_load(write_then_read, concurrency=level, count=len(strict), seconds=60)),
            ):
                if loop.errors:
                    results.notes.append(f"{name} at c{level}: {loop.errors} failed, first: {loop.first_error}")
    results.figures["write_visibility_checked"] = seen.checked
    results.figures["write_visibility_failures"] = seen.failures
    results.figures["write_read_your_write_checked"] = seen.read_your_write
    if seen.first_failure:
        results.notes.append(f"first write not found by search after ack: {seen.first_failure}")


async def measure(
    corpus: Corpus,
    work: Path,
    db_path: Path,
    stream: QueryStream,
    picks: Picks,
    seed: int,
    budget: Budget,
    results: Results,
) -> None:
    """Start `sage serve` on the imported database and measure it over REST and MCP, then writes and memory."""
    cache_dir = work / "server-cache"
    # A real deployment names its folders, so every start re-scans them (files whose stat is unchanged are passed
    # over unread). The import just wrote the corpus and the database (1.3 GB at 100k): flushed to disk first, or
    # the first start would be timed against that write-back, which a later restart never meets.
    os.sync()
    rescans: list[float] = []
    for _ in range(budget.cold_starts):
        rescan = start_sage(work, db_path, work / "rescan-cache", knowledge=corpus.folder)
        rescans.append(rescan.ready_seconds)
        stop(rescan.process)
    results.figures["cold_start_rescan_s"] = round(statistics.median(rescans), 3)
    starts: list[float] = []
    running: Running | None = None
    for _ in range(budget.cold_starts):
        if running is not None:
            stop(running.process)
        running = start_sage(work, db_path, cache_dir)
        starts.append(running.ready_seconds)
    assert running is not None
    results.figures["cold_start_s"] = round(statistics.median(starts), 3)
    try:
        await _rest(running, stream, picks, budget, results)
        async with mcp_clients(f"{running.mcp}/mcp", CONCURRENCY) as clients:
            await _mcp(clients, stream, picks, budget, results)
            await _under_search(running, stream.queries(budget.concurrent), picks, budget, results)
            await _floor(work, budget, results)
            await _writes(clients, running.api, stream, seed, budget, results)
        memory = memory_mb(running.process.pid)
        results.figures["server_peak_rss_mb"] = memory["peak_rss_mb"]
        results.figures["server_rss_mb"] = memory["rss_mb"]
    finally:
        code = stop(running.process)
        if code != 0:
            results.notes.append(f"sage serve exited {code}: {running.stderr_tail(500)}")
