"""In-process measurements: import, the embedded API's latencies, the raw sqlite3 floor, and the cache tiers."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

import sage_server
from sage_server.config import Settings
from sage_server.service import KnowledgeService
from tests.bench.corpus import Corpus, QueryStream
from tests.bench.load import CONCURRENCY, Budget, Latency, run_load
from tests.bench.report import Results
from tests.bench.sqlite_floors import raw_import, raw_ranking


def bench_settings(work: Path, **overrides: Any) -> Settings:
    """Settings that read nothing from this machine; nothing imported on open, so opening is fast."""
    values: dict[str, Any] = {
        "db_path": work / "sage.db",
        "cache_dir": work / "cache",
        "bundled_knowledge": False,
        "import_on_start": False,
        "log_level": "WARNING",
        **overrides,
    }
    return sage_server.load_settings(values, environ={}, cwd=work, home=work).settings


def db_megabytes(db_path: Path) -> float:
    """The database file and its WAL and shared-memory files, in MB."""
    paths = [db_path, db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")]
    return round(sum(p.stat().st_size for p in paths if p.exists()) / 2**20, 1)


@dataclass
class Picks:
    """Document ids for the get measurements: one pool read warm, another read cold once and then warm."""

    warm: list[str]
    cold: list[str]


def pick_ids(corpus: Corpus, budget: Budget) -> Picks:
    ids = [doc.id for doc in corpus.docs]
    step = max(1, len(ids) // (2 * budget.cache_ids + 1))
    spread = ids[::step]
    return Picks(warm=spread[: budget.cache_ids], cold=spread[budget.cache_ids : 2 * budget.cache_ids])


async def _loops(
    kb: KnowledgeService, results: Results, stream: QueryStream, picks: Picks, budget: Budget, db_path: Path
) -> None:
    work = stream.workload(budget.warmup, budget.serial, budget.concurrent)
    for q in work.warmup:
        await kb.search(q)
    for t in work.warmup_tasks:
        await kb.context(t)
    for doc_id in picks.warm:
        await kb.get(doc_id)

    serial = work.serial
    lat = await run_load(lambda w, i: kb.search(serial[i]), concurrency=1, count=len(serial), seconds=budget.seconds)
    results.latencies["inproc/search/c1"] = lat
    results.latencies["sqlite-raw/search/c1"] = raw_ranking(db_path, serial[: lat.n + lat.errors])
    # The same queries again: answered from the memory tier.
    results.latencies["inproc/search-repeat/c1"] = await run_load(
        lambda w, i: kb.search(serial[i]), concurrency=1, count=lat.n, seconds=budget.seconds
    )
    many = work.concurrent
    results.latencies["inproc/search/c32"] = lat = await run_load(
        lambda w, i: kb.search(many[i]), concurrency=CONCURRENCY, count=len(many), seconds=budget.seconds
    )
    results.latencies["sqlite-raw/search/c32"] = raw_ranking(db_path, many[: lat.n + lat.errors], CONCURRENCY)

    warm = picks.warm
    for name, concurrency, count in (("c1", 1, budget.serial), ("c32", CONCURRENCY, budget.concurrent)):
        results.latencies[f"inproc/get/{name}"] = await run_load(
            lambda w, i: kb.get(warm[i % len(warm)]), concurrency=concurrency, count=count, seconds=budget.seconds
        )
    for name, concurrency, tasks in (("c1", 1, work.serial_tasks), ("c32", CONCURRENCY, work.concurrent_tasks)):

        async def pack(w: int, i: int, tasks: list[str] = tasks) -> object:
            return await kb.context(tasks[i])

        results.latencies[f"inproc/context/{name}"] = lat = await run_load(
            pack, concurrency=concurrency, count=len(tasks), seconds=budget.seconds
        )
        done = tasks[: lat.n + lat.errors]
        results.latencies[f"sqlite-raw/context/{name}"] = raw_ranking(db_path, done, concurrency, phrases=False)


async def _cold_then_warm(kb: KnowledgeService, ids: list[str], seconds: float) -> tuple[Latency, Latency]:
    cold = await run_load(lambda w, i: kb.get(ids[i]), concurrency=1, count=len(ids), seconds=seconds)
    warm = await run_load(lambda w, i: kb.get(ids[i % len(ids)]), concurrency=1, count=3 * len(ids), seconds=seconds)
    return cold, warm


async def measure(corpus: Corpus, work: Path, stream: QueryStream, budget: Budget, results: Results) -> Picks:
    """Import into a fresh database, then time the embedded API against the raw sqlite3 floor."""
    settings = bench_settings(work)
    picks = pick_ids(corpus, budget)
    async with sage_server.open(settings) as kb:
        started = time.perf_counter()
        report = await kb.import_paths([corpus.folder])
        elapsed = time.perf_counter() - started
        if report.created != len(corpus.docs):
            results.notes.append(f"import created {report.created} of {len(corpus.docs)}: {report.skipped[:3]}")
        results.figures["import_s"] = round(elapsed, 2)
        results.figures["import_docs_per_s"] = round(report.created / elapsed, 1)
        await _loops(kb, results, stream, picks, budget, settings.db_path)
        cold, warm = await _cold_then_warm(kb, picks.cold, budget.seconds)
        results.latencies["inproc/get-cold/c1"] = cold
        results.latencies["inproc/get-warm/c1"] = warm
    results.figures["db_mb"] = db_megabytes(settings.db_path)
    results.figures["sqlite_raw_import_docs_per_s"] = round(await raw_import(corpus.folder, work, settings), 1)
    # A second instance on the same cache folder without a memory tier: what the disk tier (L2) answers in.
    async with sage_server.open(bench_settings(work, cache_memory=False)) as kb:
        results.latencies["inproc/get-disk-tier/c1"] = await run_load(
            lambda w, i: kb.get(picks.cold[i % len(picks.cold)]),
            concurrency=1,
            count=len(picks.cold),
            seconds=budget.seconds,
        )
    return picks


async def redis_reachable(url: str) -> bool:
    client: Redis = Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def measure_redis(work: Path, redis_url: str, picks: Picks, budget: Budget, results: Results) -> None:
    """Cold vs warm reads with the Redis tier on, and what Redis alone (L3) answers in from a second instance.

    Keys live under a namespace unique to this run and are deleted afterwards.
    """
    if not await redis_reachable(redis_url):
        results.notes.append(f"Redis at {redis_url} unreachable: Redis cache measurements skipped")
        return
    namespace = f"sage-bench-{uuid.uuid4().hex[:12]}"
    shared = {"redis_url": redis_url, "cache_namespace": namespace}
    try:
        with_redis = bench_settings(work, cache_dir=work / "cache-redis", **shared)
        async with sage_server.open(with_redis) as kb:
            cold, warm = await _cold_then_warm(kb, picks.warm, budget.seconds)
        results.latencies["redis/get-cold/c1"] = cold
        results.latencies["redis/get-warm/c1"] = warm
        only_redis = bench_settings(work, cache_dir=work / "cache-none", cache_memory=False, cache_disk=False, **shared)
        async with sage_server.open(only_redis) as kb:
            ids = picks.warm
            results.latencies["redis/get-redis-tier/c1"] = await run_load(
                lambda w, i: kb.get(ids[i % len(ids)]), concurrency=1, count=len(ids), seconds=budget.seconds
            )
    finally:
        client: Redis = Redis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{namespace}*", count=1000)]
            for start in range(0, len(keys), 1000):
                await client.delete(*keys[start : start + 1000])
        finally:
            await client.aclose()
