"""`python -m tests.bench [--sizes 1000,10000,100000] [--postgres-sizes 10000 | --no-postgres] [--seed 7]
[--out bench-results/] [--quick] [--only soak]`."""

from __future__ import annotations

import argparse
from pathlib import Path

import anyio

from tests.bench.harness import DEFAULT_REDIS_URL, DEFAULT_SIZES, PARTS, Options, run


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 10:
        raise argparse.ArgumentTypeError("sizes are comma-separated document counts of 10 or more, e.g. 1000,10000")
    return sizes


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES), help="corpus sizes (default 1000,10000)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the corpus and the queries (default 7)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON results")
    parser.add_argument(
        "--postgres-sizes",
        type=_sizes,
        help="measure PostgreSQL only at these of the sizes (default: every size; PostgreSQL imports 100k documents "
        "in minutes)",
    )
    parser.add_argument("--quick", action="store_true", help="a handful of requests per measurement (smoke runs)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis for the cache-tier measurements")
    parser.add_argument(
        "--only",
        choices=PARTS,
        help="run one part: corpus (speed and scale per corpus size), limits (resources and shutdown) or mcp (the "
        "tool list's size, and what a client honouring cache hints saves) or cluster (three instances behind nginx) or "
        "soak (RSS after `sage serve` imports the largest size at start, and after a 10-minute mixed load)",
    )
    parser.add_argument(
        "--no-postgres", action="store_true", help="leave out the PostgreSQL column (its own import of each corpus)"
    )
    args = parser.parse_args(argv)
    parts = (args.only,) if args.only else PARTS
    return Options(
        sizes=args.sizes,
        seed=args.seed,
        out=args.out,
        quick=args.quick,
        redis_url=args.redis_url,
        parts=parts,
        postgres_sizes=[] if args.no_postgres else args.postgres_sizes,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark. Targets missed are reported, not fatal: the exit code is 0 unless the run itself failed."""
    anyio.run(run, parse(argv))


if __name__ == "__main__":
    main()
