"""Three instances behind nginx (`--only cluster`): writes and reads at c=32 through the balancer next to one
instance reached directly (the floor, measured in the same run), and how long a write through one instance takes to
be read through another (the promise: within a second)."""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx

from tests.bench.load import Latency, run_load
from tests.bench.report import SectionResults, Target, section_json, section_table
from tests.cluster_support import NAMES, Cluster

Progress = Callable[[str], None]
CONCURRENCY = 32


ClusterResults = SectionResults


FIGURES = {
    "propagation_p50_ms": "a write through one instance, read through another: p50 ms",
    "propagation_max_ms": "... the slowest of the samples, ms",
    "propagation_samples": "... samples",
    "write_ratio": "writes at c=32: throughput through nginx / one instance directly",
}


def targets(r: ClusterResults) -> list[Target]:
    f = r.figures.get
    through = r.latencies.get("writes, 3 instances through nginx, c=32")
    return [
        Target("a write read through another instance (slowest sample)", f("propagation_max_ms"), 1000, "ms"),
        Target("failed writes through nginx", float(through.errors) if through else None, 0, ""),
    ]


async def measure(work: Path, redis_url: str, quick: bool, progress: Progress) -> ClusterResults:
    results = ClusterResults()
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        results.notes.append("nginx is not installed (apt-get install nginx-light): nothing measured")
        return results
    cluster = Cluster(work, redis_url)
    progress("cluster: three sage serve instances and nginx")
    await anyio.to_thread.run_sync(cluster.start)
    try:
        count, seconds = (200, 5.0) if quick else (3000, 30.0)
        direct = cluster.instances[NAMES[0]].url
        for label, url in (("one instance directly", direct), ("3 instances through nginx", cluster.url)):
            progress(f"cluster: writes at c={CONCURRENCY}, {label}")
            results.latencies[f"writes, {label}, c={CONCURRENCY}"] = await _writes(url, cluster.headers, count, seconds)
            progress(f"cluster: reads at c={CONCURRENCY}, {label}")
            results.latencies[f"reads, {label}, c={CONCURRENCY}"] = await _reads(url, cluster.headers, count, seconds)
        progress("cluster: propagation between instances")
        delays = await anyio.to_thread.run_sync(_propagation, cluster, 5 if quick else 30)
        results.figures["propagation_p50_ms"] = round(statistics.median(delays), 1)
        results.figures["propagation_max_ms"] = round(max(delays), 1)
        results.figures["propagation_samples"] = len(delays)
        one = results.latencies[f"writes, one instance directly, c={CONCURRENCY}"]
        three = results.latencies[f"writes, 3 instances through nginx, c={CONCURRENCY}"]
        results.figures["write_ratio"] = round(three.rps / one.rps, 2) if one.rps else float("nan")
        results.notes.append(
            "every instance writes to one SQLite file (one writer at a time), so writes do not scale with instances "
            "until the PostgreSQL backend; on one 2-core machine the instances, nginx and the load share the cores"
        )
    finally:
        await anyio.to_thread.run_sync(cluster.stop)
    return results


async def _writes(url: str, headers: dict[str, str], count: int, seconds: float) -> Latency:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        stamp = time.time_ns()

        async def write(worker: int, n: int) -> None:
            body = {"title": f"Bench note {n}", "layer": "practices", "body": f"Written by worker {worker}, {n}."}
            (await http.put(f"/v1/knowledge/bench-{stamp}-{n}", json=body)).raise_for_status()

        return await run_load(write, concurrency=CONCURRENCY, count=count, seconds=seconds)


async def _reads(url: str, headers: dict[str, str], count: int, seconds: float) -> Latency:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:

        async def read(worker: int, n: int) -> None:
            (await http.get("/v1/search", params={"q": f"bench note {n % 50}"})).raise_for_status()

        return await run_load(read, concurrency=CONCURRENCY, count=count, seconds=seconds)


def _propagation(cluster: Cluster, samples: int) -> list[float]:
    """Milliseconds from a write's answer on one instance to the first read of the new revision on the next one,
    polling every millisecond; instances take turns writing."""
    urls = [cluster.instances[name].url for name in NAMES]
    delays = []
    with httpx.Client(headers=cluster.headers, timeout=30) as http:
        for n in range(samples):
            writer, reader = urls[n % 3], urls[(n + 1) % 3]
            body = {"title": "Propagation", "layer": "practices", "body": f"Sample {n}."}
            http.get(f"{reader}/v1/knowledge/propagation")  # the reader holds the old revision in its caches
            etag = http.put(f"{writer}/v1/knowledge/propagation", json=body).headers["etag"]
            written = time.perf_counter()
            while http.get(f"{reader}/v1/knowledge/propagation").headers.get("etag") != etag:
                if time.perf_counter() - written > 30:
                    break
                time.sleep(0.001)
            delays.append((time.perf_counter() - written) * 1000)
    return delays


def table(r: ClusterResults) -> str:
    return section_table("cluster", r.latencies, r.figures, FIGURES, targets(r), r.notes)


def to_json(r: ClusterResults) -> dict[str, Any]:
    return section_json(r.latencies, r.figures, targets(r), r.notes)
