"""What a run found: the measurements of each corpus size, the targets judged against them, the table and the JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.load import Latency


@dataclass
class Results:
    """Everything measured for one corpus size."""

    size: int
    latencies: dict[str, Latency] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)  # single numbers: rates, sizes, times, counts
    notes: list[str] = field(default_factory=list)

    def latency(self, name: str) -> Latency | None:
        return self.latencies.get(name)


@dataclass
class SectionResults:
    """What one of the parts beside the corpus measured (cluster, soak): latencies, single figures, notes."""

    latencies: dict[str, Latency] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    """A limit and what this run measured against it. Misses are reported, never fatal: machines are noisy.

    `required`, where set, is the hard bound of issue 20's rows (REQUIRED in the table): above `limit` is a MISS,
    above `required` too a FAIL."""

    name: str
    measured: float | None
    limit: float
    unit: str
    higher_is_better: bool = False
    required: float | None = None
    # The same work done by SQLite alone in this run (tests/bench/sqlite_floors.py): how close the hardware allows.
    floor: float | None = None

    def _within(self, bound: float) -> bool:
        assert self.measured is not None
        return self.measured >= bound if self.higher_is_better else self.measured <= bound

    @property
    def passed(self) -> bool | None:
        if self.measured is None or math.isnan(self.measured):
            return None
        return self._within(self.limit)

    @property
    def verdict(self) -> str:
        if self.passed is False and self.required is not None and not self._within(self.required):
            return "FAIL"
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]

    @property
    def of_limit(self) -> float | None:
        """measured / limit: below 1 is good for a ceiling, above 1 for a floor."""
        if self.measured is None or math.isnan(self.measured) or self.limit == 0:
            return None
        return self.measured / self.limit

    def bounds(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        hard = f" (REQUIRED {sign}{_num(self.required)}{self.unit})" if self.required is not None else ""
        return f"{sign}{_num(self.limit)}{self.unit}{hard}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or math.isnan(numerator + denominator):
        return None
    return round(numerator / denominator, 3)


# The PostgreSQL figures are this run's SQLite names with this prefix (tests/bench/postgres.py measures them), and
# the floor of in-process search there is its raw ranking statement.
PG = "pg/"
RAW_FLOOR = {"": "sqlite-raw/search/c1", PG: "pg-raw/search/c1"}
# Names the PostgreSQL part wrote before the prefix rule: read when the prefixed name is absent.
LEGACY = {"pg/inproc/search/c1": "pg/search/c1", "pg/import_docs_per_s": "pg_import_docs_per_s"}


def targets(r: Results, prefix: str = "") -> list[Target]:
    """The targets, on the figures named with `prefix` ("" for SQLite, PG for PostgreSQL): issue 20's rows at 100k
    documents first (judged at every size, so a run at 10k shows how far it is), then the others. The raw floors
    are SQLite's alone: no figure carries their names with the PG prefix, so PostgreSQL's rows have none."""

    def get(name: str, what: str) -> float | None:
        found = r.latency(prefix + name) or r.latency(LEGACY.get(prefix + name, ""))
        return None if found is None or found.n == 0 else float(getattr(found, what))

    def figure(name: str) -> float | None:
        return r.figures.get(prefix + name, r.figures.get(LEGACY.get(prefix + name, "")))

    return [
        Target(
            "context p99, REST at c=32",
            get("rest/context/c32", "p99_ms"),
            1000,
            "ms",
            required=5000,
            floor=get("sqlite-raw/context/c32", "p99_ms"),
        ),
        Target(
            "context p99, MCP at c=32",
            get("mcp/context/c32", "p99_ms"),
            1000,
            "ms",
            required=5000,
            floor=get("sqlite-raw/context/c32", "p99_ms"),
        ),
        Target(
            "context p50, in-process at c=1",
            get("inproc/context/c1", "p50_ms"),
            100,
            "ms",
            floor=get("sqlite-raw/context/c1", "p50_ms"),
        ),
        Target(
            "search throughput, REST at c=32",
            get("rest/search/c32", "rps"),
            200,
            "/s",
            higher_is_better=True,
            floor=get("sqlite-raw/search/c32", "rps"),
        ),
        Target(
            "search p99, in-process at c=1",
            get("inproc/search/c1", "p99_ms"),
            50,
            "ms",
            floor=get("sqlite-raw/search/c1", "p99_ms"),
        ),
        Target(
            "in-process search p50 / the raw ranking statement p50 (1k docs)",
            _ratio(get("inproc/search/c1", "p50_ms"), get_raw(r, RAW_FLOOR[prefix])),
            1.5,
            "x",
        ),
        Target(
            "import throughput",
            figure("import_docs_per_s"),
            3000,
            "docs/s",
            higher_is_better=True,
            floor=figure("sqlite_raw_import_docs_per_s"),
        ),
        Target(
            "restart re-scanning the unchanged corpus, to /ready", figure("cold_start_rescan_s"), 5, "s", required=5
        ),
        Target("server peak RSS", figure("server_peak_rss_mb"), 200, "MB"),
        Target("/health p99 while 32 searches run", get("rest/health-under-32-searches/c1", "p99_ms"), 100, "ms"),
        Target("warm get p99 while 32 searches run", get("rest/get-under-32-searches/c1", "p99_ms"), 100, "ms"),
        Target("in-process get-by-id warm p99", get("inproc/get/c1", "p99_ms"), 1.0, "ms"),
        Target(
            "REST get-by-id warm req/s / bare Starlette req/s (c32)",
            _ratio(get("rest/get/c32", "rps"), get_raw(r, "floor/get/c32", "rps")),
            0.5,
            "x",
            higher_is_better=True,
        ),
        Target(
            "MCP search p50 / REST search p50 (c1)",
            _ratio(get("mcp/search/c1", "p50_ms"), get("rest/search/c1", "p50_ms")),
            2.0,
            "x",
        ),
        Target("MCP writes accepted/s at c32", get("mcp/write/c32", "rps"), 200, "/s", higher_is_better=True),
        Target("MCP write p95 at c32", get("mcp/write/c32", "p95_ms"), 200, "ms"),
        Target("write visible to search once acknowledged: failures", figure("write_visibility_failures"), 0, ""),
        Target("cold start to /ready (target at 10k docs)", figure("cold_start_s"), 2.0, "s"),
    ]


def get_raw(r: Results, name: str, what: str = "p50_ms") -> float | None:
    """A measurement by its full name (floors have no PostgreSQL prefix)."""
    found = r.latency(name)
    return None if found is None or found.n == 0 else float(getattr(found, what))


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


# Single numbers shown in the table, with their labels.
FIGURES = {
    "corpus_mb": "corpus Markdown (MB)",
    "import_docs_per_s": "import (docs/s)",
    "import_s": "import (s)",
    "sqlite_raw_import_docs_per_s": "raw floor: SQLite's writes of the same import alone (docs/s)",
    "db_mb": "database on disk (MB)",
    "pg/import_docs_per_s": "import into PostgreSQL (docs/s)",
    "pg/import_s": "import into PostgreSQL (s)",
    "cold_start_s": "cold start to /ready, import off (s, median)",
    "cold_start_rescan_s": "cold start to /ready, re-scanning the unchanged corpus (s, median)",
    "server_peak_rss_mb": "server peak RSS, VmHWM (MB)",
    "server_rss_mb": "server RSS at the end (MB)",
    "write_visibility_checked": "writes searched for after their ack",
    "write_read_your_write_checked": "... of them by the writer at once (read-your-write)",
    "write_visibility_failures": "writes not found by search after ack",
}


def table(results: list[Results]) -> str:
    """The one table a run prints: every latency, the single figures, and the targets, per corpus size."""
    lines: list[str] = []
    header = (
        f"{'docs':>7}  {'measurement':<34} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'req/s':>8} err partial"
    )
    rule = "-" * len(header)
    lines += [header, rule]
    for r in results:
        for name, lat in r.latencies.items():
            lines.append(
                f"{r.size:>7}  {name:<34} {lat.n:>5} {_num(lat.p50_ms, 3):>9} {_num(lat.p99_ms, 3):>9} "
                f"{_num(lat.mean_ms, 3):>9} {_num(lat.rps, 1):>8} {lat.errors:>3} {lat.partial:>7}"
            )
        for key, label in FIGURES.items():
            for name, shown in ((key, label), (PG + key, f"{label}, PostgreSQL")):
                if name in r.figures:
                    lines.append(f"{r.size:>7}  {shown:<64} {_num(r.figures[name]):>10}")
        lines.append(rule)
    lines += target_lines(results)
    return "\n".join(lines)


def has_postgres(r: Results) -> bool:
    """Whether this run measured PostgreSQL figures named with the PG prefix (or the older names)."""
    names = [*r.latencies, *r.figures]
    return any(name.startswith(PG) or name in LEGACY.values() for name in names)


def target_lines(results: list[Results]) -> list[str]:
    """The targets per corpus size: measured on SQLite and, where this run measured it, on PostgreSQL."""
    header = (
        f"{'docs':>7}  {'target':<58} {'limit':>26}  {'SQLite':>10} {'verdict':<7} {'raw floor':>12}  "
        f"{'PostgreSQL':>10} verdict"
    )
    rule = "-" * len(header)
    lines = [header, rule]
    for r in results:
        pg = targets(r, PG) if has_postgres(r) else None
        for number, t in enumerate(targets(r)):
            on_pg = pg[number] if pg is not None else None
            pg_part = f"  {_measured(on_pg):>10} {on_pg.verdict}" if on_pg is not None else ""
            floor = "" if t.floor is None else f"{_num(t.floor)}{t.unit}"
            lines.append(
                f"{r.size:>7}  {t.name:<58} {t.bounds():>26}  {_measured(t):>10} {t.verdict:<7} {floor:>12}"
                f"{pg_part}".rstrip()
            )
        lines += [f"{r.size:>7}  note: {note}" for note in r.notes]
        lines.append(rule)
    return lines


def _measured(t: Target) -> str:
    return "-" if t.measured is None else f"{_num(t.measured)}{t.unit}"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }


def to_json(results: list[Results], options: dict[str, Any]) -> dict[str, Any]:
    """The JSON document written to the output folder."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "options": options,
        "results": [
            {
                "size": r.size,
                "latencies": {name: asdict(lat) for name, lat in r.latencies.items()},
                "figures": r.figures,
                "notes": r.notes,
                "targets": [_target_json(t) for t in targets(r)],
                "pg_targets": [_target_json(t) for t in targets(r, PG)] if has_postgres(r) else [],
            }
            for r in results
        ],
    }


def _target_json(t: Target) -> dict[str, Any]:
    return {**asdict(t), "passed": t.passed, "verdict": t.verdict, "of_limit": t.of_limit}


def write_json(folder: Path, document: dict[str, Any]) -> Path:
    """Write `document` under `folder` with a timestamped name; NaN becomes null so any JSON reader takes it."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = "-".join([str(r["size"]) for r in document["results"]] + (["limits"] if "limits" in document else []))
    path = folder / f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{sizes}.json"
    path.write_text(json.dumps(_finite(document), indent=2) + "\n", encoding="utf-8")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def section_table(
    title: str,
    latencies: dict[str, Latency],
    figures: dict[str, float],
    labels: dict[str, str],
    judged: list[Target],
    notes: list[str],
) -> str:
    """One part's section of the printed table: latencies, figures (in the order of `labels`), targets, notes."""
    rule = "-" * 92
    lines = [f"{title:<9}  {'measurement':<64} {'value':>10}", rule]
    for name, lat in latencies.items():
        lines.append(
            f"{'':<9}  {name + ' p50 / p99 ms':<64} {_num(lat.p50_ms, 3):>10} / {_num(lat.p99_ms, 3)}"
            f"  (n {lat.n}, {_num(lat.rps)}/s, errors {lat.errors})"
        )
    lines += [f"{'':<9}  {label:<64} {_num(figures[key]):>10}" for key, label in labels.items() if key in figures]
    lines.append(rule)
    for t in judged:
        limit = f"{'>=' if t.higher_is_better else '<='}{_num(t.limit)}{t.unit}"
        measured = "-" if t.measured is None else f"{_num(t.measured)}{t.unit}"
        lines.append(f"{'target':<9}  {t.name:<64} {measured:>10} {limit:>8}  {t.verdict}")
    lines += [f"{'note':<9}  {note}" for note in notes]
    return "\n".join(lines)


def section_json(
    latencies: dict[str, Latency], figures: dict[str, float], judged: list[Target], notes: list[str]
) -> dict[str, Any]:
    return {
        "latencies": {name: asdict(lat) for name, lat in latencies.items()},
        "figures": figures,
        "notes": notes,
        "targets": [{**asdict(t), "passed": t.passed, "verdict": t.verdict} for t in judged],
    }
