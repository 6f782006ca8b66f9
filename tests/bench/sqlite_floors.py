"""The raw sqlite3 floors: what SQLite alone takes for the work SAGE asks of it, measured in the same run, so a missed
target shows how close the hardware allows. Each runs SAGE's own statements straight through Python's sqlite3,
without SAGE around them: the ranking statement for searches and context tasks (plain BM25 over every term, one
connection per worker, as SAGE's readers), and the writes of an import with its rows made beforehand."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio

from sage_server import ingest, search
from sage_server.config import Settings
from sage_server.store.records import Source
from sage_server.store.rows import document_fields, section_rows, source_fields
from sage_server.store.sqlite import SqliteStore, default_readers
from sage_server.store.sqlite_connections import CACHE_BYTES, PRAGMAS, cache_kib
from sage_server.store.sqlite_documents import DOCUMENT_INSERT, INDEX_FROM_KEY, SECTION_INSERT
from sage_server.store.sqlite_search import rank_documents_sql
from tests.bench.load import Latency, summarize

# Rows written per transaction chunk by the import floor: what SAGE's early writer hands over (ingest.HAND_OVER).
CHUNK = ingest.HAND_OVER


def ranking_statement(fts: str, limit: int = 10) -> tuple[str, list[object]]:
    """The exact SQL and parameters SAGE's BM25 ranking runs for `fts` (the store's own statement)."""
    return rank_documents_sql(fts, None, None, limit, 0)


def _reader(db_path: Path) -> sqlite3.Connection:
    """A read-only connection set up as SAGE's readers are (temp store, page cache share)."""
    # Opened in a worker thread and closed from the caller once every worker is done.
    conn = sqlite3.connect(
        f"{db_path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
    )
    for pragma in PRAGMAS:
        if "journal_mode" not in pragma:
            conn.execute(pragma)
    conn.execute(f"PRAGMA cache_size=-{cache_kib(CACHE_BYTES, default_readers())[1]}")
    return conn


def raw_ranking(db_path: Path, texts: list[str], concurrency: int = 1, phrases: bool = True) -> Latency:
    """The plain BM25 statement for each text (its terms ORed, as SAGE parses a query; a context task is parsed
    with `phrases` off), from `concurrency` threads with a connection each; a tenth of them run once first to warm
    the cache. SQLite releases the GIL while it ranks, so the threads use every core."""
    statements = []
    for text in texts:
        parsed = search.parse_query(text, phrases=phrases)
        if parsed.terms:
            statements.append(ranking_statement(parsed.fts()))
    local = threading.local()
    opened: list[sqlite3.Connection] = []

    def run(statement: tuple[str, list[object]]) -> float:
        if not hasattr(local, "conn"):
            local.conn = _reader(db_path)
            opened.append(local.conn)
        begin = time.perf_counter()
        local.conn.execute(*statement).fetchall()
        return time.perf_counter() - begin

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(run, statements[: max(1, len(statements) // 10)]))
            started = time.perf_counter()
            samples = list(pool.map(run, statements))
            return summarize(samples, time.perf_counter() - started, concurrency)
    finally:
        for conn in opened:
            conn.close()


async def raw_import(folder: Path, work: Path, settings: Settings) -> float:
    """Documents per second SQLite writes an import at: the corpus's rows (made from its files before the clock
    starts, chunk by chunk) inserted into a fresh database of SAGE's schema with SAGE's statements (documents,
    their full-text index in one INSERT ... SELECT, sections), in one transaction, as `SqliteWriter.insert_many`
    writes them. Only the SQLite calls are timed; the database is removed afterwards."""
    db_path = work / "floor-import.db"
    store = SqliteStore(db_path)
    await store.open()  # SAGE's migrations: the same tables, triggers and indexes
    await store.close()
    return await anyio.to_thread.run_sync(_raw_import, folder, db_path, settings)


def _raw_import(folder: Path, db_path: Path, settings: Settings) -> float:
    root = folder.resolve()
    paths = sorted(Path(name) for name, problem, _ in ingest.scan(root) if problem is None)
    conn = sqlite3.connect(db_path, isolation_level=None)
    spent, written = 0.0, 0
    try:
        for pragma in PRAGMAS:
            conn.execute(pragma)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO meta (key, value) VALUES ('index_later', '1')")
        for start in range(0, len(paths), CHUNK):
            rows, sections = [], []
            for key, path in enumerate(paths[start : start + CHUNK], start=start + 1):
                parsed = ingest.parse_file(path, root, settings)
                source = Source(parsed.path, parsed.source_hash, parsed.stat)
                fields = {**document_fields(parsed.doc), "key": key, "id": parsed.doc.id, **source_fields(source)}
                rows.append({**fields, "now": "2026-01-01T00:00:00.000Z"})
                sections += section_rows(key, parsed.doc.body)
            begin = time.perf_counter()
            conn.executemany(DOCUMENT_INSERT, rows)
            conn.execute(INDEX_FROM_KEY, (start + 1,))
            conn.executemany(SECTION_INSERT, sections)
            spent += time.perf_counter() - begin
            written += len(rows)
        begin = time.perf_counter()
        conn.execute("DELETE FROM meta WHERE key = 'index_later'")
        conn.execute("COMMIT")
        spent += time.perf_counter() - begin
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    return written / spent if spent else float("nan")
