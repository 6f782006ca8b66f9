"""Memory over time (`--only soak`): `sage serve` imports a generated corpus at start (its RSS then), then serves a
mixed load from 32 workers for ten minutes (20 seconds with --quick): searches, gets, context packing and writes
over REST, sampling the server's RSS every few seconds. Every in-process cache is bounded by settings, so the RSS
must level off rather than grow with the requests served."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx

from tests.bench.corpus import QueryStream, generate
from tests.bench.load import CONCURRENCY, summarize
from tests.bench.remote import http_clients
from tests.bench.report import SectionResults, Target, section_json, section_table
from tests.bench.servers import memory_mb, start_sage, stop

Progress = Callable[[str], None]
FULL_SECONDS, QUICK_SECONDS = 600.0, 20.0
SAMPLE_SECONDS = 5.0
# The mix of one worker's requests, by share: mostly searches, as an assistant's traffic is.
MIX = (("search", 0.55), ("get", 0.25), ("context", 0.15), ("write", 0.05))
RSS_LIMIT_MB = 200


SoakResults = SectionResults


FIGURES = {
    "docs": "documents imported at the server's start",
    "import_s": "... start to /ready, importing them (s)",
    "rss_after_import_mb": "server RSS after the import (MB)",
    "peak_after_import_mb": "server peak RSS after the import, VmHWM (MB)",
    "seconds": "mixed load, seconds",
    "rss_first_sample_mb": "... RSS at the first sample (MB)",
    "rss_after_soak_mb": "... RSS at the end (MB)",
    "peak_after_soak_mb": "... peak RSS, VmHWM (MB)",
    "rss_growth_second_half_mb": "... RSS growth over the second half of the run (MB)",
}


def targets(r: SoakResults) -> list[Target]:
    f = r.figures.get
    return [
        Target("server peak RSS after the import and the mixed load", f("peak_after_soak_mb"), RSS_LIMIT_MB, "MB"),
        Target("RSS growth over the second half of the mixed load", f("rss_growth_second_half_mb"), 20, "MB"),
    ]


async def measure(work: Path, size: int, seed: int, quick: bool, progress: Progress) -> SoakResults:
    """Generate `size` documents, start `sage serve` importing them, then run the mixed load and sample RSS."""
    results = SoakResults()
    corpus = generate(work / "corpus", size, seed)
    progress(f"soak: sage serve importing {size} documents at start")
    running = await anyio.to_thread.run_sync(
        lambda: start_sage(work, work / "sage.db", work / "cache", knowledge=corpus.folder, ready_within=1800)
    )
    try:
        after_import = memory_mb(running.process.pid)
        results.figures.update(
            docs=size,
            import_s=round(running.ready_seconds, 2),
            rss_after_import_mb=after_import["rss_mb"],
            peak_after_import_mb=after_import["peak_rss_mb"],
        )
        seconds = QUICK_SECONDS if quick else FULL_SECONDS
        progress(f"soak: mixed load for {seconds:.0f} s")
        ids = [doc.id for doc in corpus.docs]
        samples = await _mixed(running.api, running.process.pid, QueryStream(corpus.vocabulary, seed), ids, seconds)
        for op, taken in samples.times.items():
            results.latencies[f"soak/{op}/c{CONCURRENCY}"] = summarize(taken, samples.seconds, CONCURRENCY)
        for op, errors in samples.errors.items():
            results.notes.append(f"{op}: {errors} failed, first: {samples.first_error.get(op)}")
        rss = samples.rss
        end = memory_mb(running.process.pid)
        results.figures.update(
            seconds=round(samples.seconds, 1),
            rss_first_sample_mb=rss[0] if rss else end["rss_mb"],
            rss_after_soak_mb=end["rss_mb"],
            peak_after_soak_mb=end["peak_rss_mb"],
            rss_growth_second_half_mb=round(end["rss_mb"] - rss[len(rss) // 2], 1) if rss else 0.0,
        )
    finally:
        await anyio.to_thread.run_sync(stop, running.process)
    return results


@dataclass
class Samples:
    times: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op, _ in MIX})
    errors: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)
    rss: list[float] = field(default_factory=list)
    seconds: float = 0.0


async def _mixed(api: str, pid: int, stream: QueryStream, ids: list[str], seconds: float) -> Samples:
    found = Samples()
    ops, weights = [op for op, _ in MIX], [share for _, share in MIX]
    deadline = time.monotonic() + seconds
    queries, tasks = stream.queries(20_000), stream.tasks(5_000)
    counter = iter(range(10**9))

    async def one(client: httpx.AsyncClient, rng: random.Random, op: str, n: int) -> httpx.Response:
        if op == "search":
            return await client.get("/v1/search", params={"q": queries[n % len(queries)]})
        if op == "get":
            return await client.get(f"/v1/knowledge/{rng.choice(ids)}")
        if op == "context":
            return await client.get("/v1/context", params={"task": tasks[n % len(tasks)]})
        body = {"title": f"Soak note {n}", "layer": "practices", "body": f"# Soak note {n}\n\n{queries[n % 97]}.\n"}
        return await client.put(f"/v1/knowledge/soak-note-{n % 500}", json=body)

    async def worker(client: httpx.AsyncClient, number: int) -> None:
        rng = random.Random(number)
        while time.monotonic() < deadline:
            op = rng.choices(ops, weights)[0]
            started = time.perf_counter()
            try:
                response = await one(client, rng, op, next(counter))
                failed = (
                    None if response.status_code in (200, 201) else f"HTTP {response.status_code} {response.text[:200]}"
                )
            except httpx.HTTPError as exc:
                failed = f"{type(exc).__name__}: {exc}"
            if failed is None:
                found.times[op].append(time.perf_counter() - started)
            else:
                found.errors[op] = found.errors.get(op, 0) + 1
                found.first_error.setdefault(op, failed)

    async def sampler() -> None:
        while time.monotonic() < deadline:
            found.rss.append(memory_mb(pid)["rss_mb"])
            await anyio.sleep(min(SAMPLE_SECONDS, max(0.0, deadline - time.monotonic())))

    started = time.perf_counter()
    async with http_clients(api) as clients, anyio.create_task_group() as group:
        group.start_soon(sampler)
        for number, client in enumerate(clients):
            group.start_soon(worker, client, number)
    found.seconds = time.perf_counter() - started
    return found


def table(r: SoakResults) -> str:
    return section_table("soak", r.latencies, r.figures, FIGURES, targets(r), r.notes)


def to_json(r: SoakResults) -> dict[str, Any]:
    return section_json(r.latencies, r.figures, targets(r), r.notes)
