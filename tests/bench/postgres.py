"""The PostgreSQL column: the same corpus imported into a PostgreSQL database of its own, searched through the embedded
API, next to its floor, the store's own ranking statement run straight through psycopg."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg

import sage_server
from sage_server import search
from sage_server.errors import SageError
from sage_server.store.postgres_search import PostgresSearch
from tests.bench.corpus import Corpus, QueryStream
from tests.bench.inprocess import bench_settings
from tests.bench.load import CONCURRENCY, Budget, Latency, run_load
from tests.bench.report import Results
from tests.postgres_support import SERVER, scratch_database


async def postgres_reachable() -> bool:
    try:
        async with await psycopg.AsyncConnection.connect(f"{SERVER}/postgres", connect_timeout=2):
            return True
    except psycopg.Error:
        return False


async def raw_postgres_search(url: str, queries: list[str]) -> Latency:
    """The floor for search on PostgreSQL: the statement `rank_documents` runs, through one plain connection."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, options="-c jit=off") as conn:
        index = PostgresSearch()
        index.conn = conn  # type: ignore[assignment]  # a tuple-row connection is enough to build the statements
        statements = []
        for query in queries:
            parsed = search.parse_query(query)
            if parsed.terms:
                statements.append(await index.rank_documents_sql(parsed.fts(), None, None, search.CANDIDATES, 0))
        for sql, params in statements[: max(1, len(statements) // 10)]:
            await (await conn.execute(sql, params)).fetchall()

        async def run(w: int, i: int) -> object:
            sql, params = statements[i]
            return await (await conn.execute(sql, params)).fetchall()

        return await run_load(run, concurrency=1, count=len(statements), seconds=3600)


async def measure(corpus: Corpus, work: Path, stream: QueryStream, budget: Budget, results: Results) -> None:
    """Import into a new PostgreSQL database, then time the embedded API there as inprocess.py times it on SQLite
    (search at c=1 next to the raw ranking statement, search at c=32, context at c=1 and c=32), under the same names
    with a `pg/` prefix."""
    if not await postgres_reachable():
        results.notes.append(f"PostgreSQL column skipped: no server at {SERVER}")
        return
    async with scratch_database() as url:
        settings = bench_settings(work, database_url=url, cache_dir=work / "cache-pg")
        async with sage_server.open(settings) as kb:
            started = time.perf_counter()
            report = await kb.import_paths([corpus.folder])
            elapsed = time.perf_counter() - started
            results.figures["pg/import_s"] = round(elapsed, 2)
            results.figures["pg/import_docs_per_s"] = round(report.created / elapsed, 1)
            # Statistics as autovacuum leaves them a minute after an import (the planner needs them).
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute("VACUUM ANALYZE")
            for q in stream.queries(budget.warmup):
                try:
                    await kb.search(q)
                except SageError as exc:  # counted in the measured loop below, not fatal here
                    results.notes.append(f"PostgreSQL warm-up search failed: {exc}")
            serial = stream.queries(budget.serial)
            lat = await run_load(
                lambda w, i: kb.search(serial[i]), concurrency=1, count=len(serial), seconds=budget.seconds
            )
            results.latencies["pg/search/c1"] = lat
            results.latencies["pg-raw/search/c1"] = await raw_postgres_search(url, serial[: lat.n + lat.errors])
            many = stream.queries(budget.concurrent)
            results.latencies["pg/search/c32"] = await run_load(
                lambda w, i: kb.search(many[i]), concurrency=CONCURRENCY, count=len(many), seconds=budget.seconds
            )
            for name, concurrency, count in (("c1", 1, budget.serial), ("c32", CONCURRENCY, budget.concurrent)):
                tasks = stream.tasks(count)

                async def pack(w: int, i: int, tasks: list[str] = tasks) -> object:
                    return await kb.context(tasks[i])

                results.latencies[f"pg/context/{name}"] = await run_load(
                    pack, concurrency=concurrency, count=count, seconds=budget.seconds
                )
