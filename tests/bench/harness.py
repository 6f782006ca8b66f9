"""One benchmark run: for each corpus size, generate, import, measure in process and over the wire, then report."""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.bench import cluster, inprocess, limits, mcp, postgres, remote, soak
from tests.bench.corpus import QueryStream, generate
from tests.bench.load import FULL, QUICK
from tests.bench.report import Results, table, to_json, write_json

DEFAULT_SIZES = (1000, 10_000)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
PARTS = ("corpus", "limits", "mcp", "cluster", "soak")


@dataclass
class Options:
    """What to run: corpus sizes, the seed, where the JSON goes, and the short (--quick) budget."""

    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    seed: int = 7
    out: Path = Path("bench-results")
    quick: bool = False
    redis_url: str = DEFAULT_REDIS_URL
    # "corpus" (speed and scale per corpus size), "limits" (resources, shutdown), "mcp" (tool list, cache hints),
    # "cluster" (three instances behind nginx), "soak" (RSS after an import at start and a mixed load)
    parts: tuple[str, ...] = PARTS
    postgres_sizes: list[int] | None = None  # the corpus sizes measured on PostgreSQL too (None: every size)


def progress(message: str) -> None:
    """A line on stderr, so that stdout carries only the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def measure_size(size: int, options: Options) -> Results:
    """Every measurement for one corpus size, in a temporary folder removed afterwards."""
    budget = QUICK if options.quick else FULL
    results = Results(size)
    with tempfile.TemporaryDirectory(prefix=f"sage-bench-{size}-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        corpus = generate(work / "corpus", size, options.seed)
        results.figures["corpus_mb"] = round(corpus.bytes / 2**20, 1)
        results.figures["generate_s"] = round(time.perf_counter() - started, 2)
        progress(
            f"{size} docs: corpus of {results.figures['corpus_mb']} MB written; importing and measuring in process"
        )
        stream = QueryStream(corpus.vocabulary, options.seed)
        picks = await inprocess.measure(corpus, work, stream, budget, results)
        progress(f"{size} docs: imported at {results.figures['import_docs_per_s']} docs/s; Redis tier")
        await inprocess.measure_redis(work, options.redis_url, picks, budget, results)
        if options.postgres_sizes is None or size in options.postgres_sizes:
            progress(f"{size} docs: PostgreSQL: import, search and context")
            await postgres.measure(corpus, work, stream, budget, results)
        progress(f"{size} docs: sage serve over REST and MCP, writes")
        # A stream of its own, made with the same seed: REST is measured on the queries in-process was.
        served = QueryStream(corpus.vocabulary, options.seed)
        await remote.measure(corpus, work, work / "sage.db", served, picks, options.seed, budget, results)
    progress(f"{size} docs: done")
    return results


async def run(options: Options) -> tuple[list[Results], Path]:
    """Measure every size, print the table on stdout, write the JSON; returns the results and the JSON's path."""
    results = [await measure_size(size, options) for size in options.sizes] if "corpus" in options.parts else []
    resources = None
    if "limits" in options.parts:
        with tempfile.TemporaryDirectory(prefix="sage-bench-limits-") as tmp:
            resources = await limits.measure(Path(tmp), options.quick, progress)
    assistant = None
    if "mcp" in options.parts:
        with tempfile.TemporaryDirectory(prefix="sage-bench-mcp-") as tmp:
            assistant = await mcp.measure(Path(tmp), options.quick, progress)
    several = None
    if "cluster" in options.parts:
        with tempfile.TemporaryDirectory(prefix="sage-bench-cluster-") as tmp:
            several = await cluster.measure(Path(tmp), options.redis_url, options.quick, progress)
    memory = None
    if "soak" in options.parts:
        with tempfile.TemporaryDirectory(prefix="sage-bench-soak-") as tmp:
            memory = await soak.measure(Path(tmp), max(options.sizes), options.seed, options.quick, progress)
    if results:
        print(table(results), flush=True)
    if resources is not None:
        print(limits.table(resources), flush=True)
    if assistant is not None:
        print(mcp.table(assistant), flush=True)
    if several is not None:
        print(cluster.table(several), flush=True)
    if memory is not None:
        print(soak.table(memory), flush=True)
    settings = {**asdict(options), "out": str(options.out), "budget": asdict(QUICK if options.quick else FULL)}
    document = to_json(results, settings)
    if resources is not None:
        document["limits"] = limits.to_json(resources)
    if assistant is not None:
        document["mcp"] = mcp.to_json(assistant)
    if several is not None:
        document["cluster"] = cluster.to_json(several)
    if memory is not None:
        document["soak"] = soak.to_json(memory)
    path = write_json(options.out, document)
    progress(f"results written to {path}")
    return results, path
