"""SQLite connections: one serialized writer and a small pool of readers that never block it (WAL)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite
import anyio

from sage_server.errors import Unavailable

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",  # durable across application crashes; WAL keeps the file consistent
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",  # other processes writing the same file wait instead of failing
    "PRAGMA temp_store=MEMORY",
)
# The page cache of all connections together, by default: half for the writer (imports build the index through it),
# half shared by the readers. Each connection's cache fills up to its size and stays: with 32 MB each, five
# connections held 160 MB of a 100k-document server's 250 MB RSS, and a reader's hit rate hardly changes between
# 8 and 32 MB (its misses are served from the OS page cache).
CACHE_BYTES = 64 * 2**20
MIN_CACHE_KIB = 2048


def cache_kib(total_bytes: int, readers: int) -> tuple[int, int]:
    """The page cache of the writer and of each reader, in KiB, from the total for all of them."""
    half = total_bytes // 2 // 1024
    return max(MIN_CACHE_KIB, half), max(MIN_CACHE_KIB, half // max(1, readers))


async def _connect(path: Path, *, readonly: bool = False, cache: int = MIN_CACHE_KIB) -> aiosqlite.Connection:
    target = f"{path.resolve().as_uri()}?mode=ro" if readonly else str(path)
    conn = await aiosqlite.connect(target, uri=readonly, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        for pragma in PRAGMAS:
            if readonly and "journal_mode" in pragma:
                continue
            await conn.execute(pragma)
        await conn.execute(f"PRAGMA cache_size=-{int(cache)}")  # negative: KiB
    except sqlite3.DatabaseError:
        await conn.close()
        raise
    return conn


class Database:
    """Owns the connections to one SQLite file."""

    def __init__(self, path: Path, readers: int = 3, cache_bytes: int = CACHE_BYTES) -> None:
        self.path = path
        self._reader_count = readers
        self._writer_cache, self._reader_cache = cache_kib(cache_bytes, readers)
        self._writer: aiosqlite.Connection | None = None
        self._idle: list[aiosqlite.Connection] = []
        self._readers: list[aiosqlite.Connection] = []
        self._available = anyio.Semaphore(readers)
        self._write_lock = anyio.Lock()

    async def open_writer(self) -> aiosqlite.Connection:
        """Open the writer connection (migrations run on it before readers open)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = await _connect(self.path, cache=self._writer_cache)
        except (sqlite3.Error, OSError) as exc:
            raise Unavailable(f"cannot open database {self.path}: {exc}", path=str(self.path)) from exc
        return self._writer

    async def open_readers(self) -> None:
        """Open the reader pool."""
        try:
            for _ in range(self._reader_count):
                conn = await _connect(self.path, readonly=True, cache=self._reader_cache)
                self._readers.append(conn)
                self._idle.append(conn)
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open database {self.path} for reading: {exc}") from exc

    @property
    def writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise Unavailable("the database is not open")
        return self._writer

    @asynccontextmanager
    async def read(self) -> AsyncIterator[aiosqlite.Connection]:
        """Borrow a reader connection."""
        async with self._available:
            conn = self._idle.pop()
            try:
                yield conn
            except anyio.get_cancelled_exc_class():
                # A deadline cancelled the await, not the query, which may still run and hold an open statement
                # (and an interrupt would then also hit the next reader's statements): stop it, and put a fresh
                # connection in its place.
                with anyio.CancelScope(shield=True):
                    conn = await self._replace(conn)
                raise
            finally:
                self._idle.append(conn)

    async def _replace(self, conn: aiosqlite.Connection) -> aiosqlite.Connection:
        await conn.interrupt()
        try:
            await conn.close()
        except sqlite3.Error:
            pass  # it was being interrupted; it is closed all the same
        fresh = await _connect(self.path, readonly=True, cache=self._reader_cache)
        self._readers = [fresh if c is conn else c for c in self._readers]
        return fresh

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """Run a write transaction: serialized in this process, BEGIN IMMEDIATE against other processes."""
        async with self._write_lock:
            conn = self.writer
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.execute("ROLLBACK")
                raise
            else:
                await conn.execute("COMMIT")

    async def close(self) -> None:
        """Close every connection; safe to call twice."""
        with anyio.CancelScope(shield=True):
            for conn in self._readers:
                await conn.close()
            self._readers.clear()
            self._idle.clear()
            if self._writer is not None:
                await self._writer.close()
                self._writer = None
