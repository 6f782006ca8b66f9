"""The SQLite store: one file, one serialized writer and a pool of readers (see sqlite_connections)."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import anyio

from sage_server.errors import Unavailable
from sage_server.locks import FileLock, serving_lock_path
from sage_server.logs import get_logger, log_event
from sage_server.resources import migrations_dir
from sage_server.store.migrations import migrate
from sage_server.store.sqlite_connections import CACHE_BYTES, Database
from sage_server.store.sqlite_documents import SqliteReader, SqliteWriter

log = get_logger("store")
JOB_LOCK = ".job.lock"  # in the backup folder: held by the server running the backup job
# Readers per CPU core, and the bounds: a search holds its reader while it ranks, so a pool as small as the core
# count made gets and probes queue behind searches; SQLite releases the GIL while it steps, so more readers than
# cores keep the cores busy while others wait on Python.
READERS_PER_CORE = 2
MIN_READERS = 3
MAX_READERS = 16


def default_readers(cores: int | None = None) -> int:
    """How many reader connections to open when SAGE_SQLITE_READERS is 0 (the default)."""
    found = cores if cores is not None else (os.cpu_count() or 1)
    return max(MIN_READERS, min(MAX_READERS, READERS_PER_CORE * found))


def _unavailable(exc: sqlite3.Error) -> Unavailable:
    return Unavailable(f"database error: {exc}")


class SqliteStore:
    """A knowledge base in one SQLite file."""

    backend: Literal["sqlite"] = "sqlite"
    searchable = True

    def __init__(self, path: Path, readers: int = 0, cache_bytes: int = CACHE_BYTES) -> None:
        self.path: Path | None = path
        self.db = Database(path, readers or default_readers(), cache_bytes)
        self._in_use: FileLock | None = None

    @property
    def location(self) -> str:
        return str(self.db.path)

    async def open(self) -> list[str]:
        # Held shared while open, by every SAGE process using this file: `sage restore --backup` needs it exclusively.
        in_use = FileLock(serving_lock_path(self.db.path), shared=True)
        try:
            if not in_use.acquire():
                raise Unavailable(f"{self.db.path} is being restored from a backup; try again in a moment")
        except OSError as exc:  # no lock where the folder cannot be written: opening the database says why
            log_event(log, logging.WARNING, "No in-use lock beside the database", operation="start", error=str(exc))
        try:
            applied = await migrate(await self.db.open_writer(), migrations_dir())
            await self.db.open_readers()
        except sqlite3.DatabaseError as exc:
            await self.db.close()
            in_use.release()
            raise Unavailable(f"cannot use database {self.db.path}: {exc}", path=str(self.db.path)) from exc
        except BaseException:
            await self.db.close()
            in_use.release()
            raise
        self._in_use = in_use
        return applied

    async def watch(self, seen: Callable[[int], None]) -> None:
        return None  # a file cannot push: the service polls the generation

    @asynccontextmanager
    async def read(self) -> AsyncIterator[SqliteReader]:
        try:
            async with self.db.read() as conn:
                yield SqliteReader(conn)
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[SqliteReader]:
        try:
            async with self.db.read() as conn:
                await conn.execute("BEGIN")  # one snapshot until the end, however long the reads take
                try:
                    yield SqliteReader(conn)
                finally:
                    with anyio.CancelScope(shield=True):
                        await conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    @asynccontextmanager
    async def job_lock(self, folder: Path) -> AsyncIterator[bool]:
        lock = FileLock(folder / JOB_LOCK)
        try:
            yield lock.acquire()
        finally:
            lock.release()

    async def other_sessions(self) -> list[str]:
        return []

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteWriter]:
        try:
            async with self.db.transaction() as conn:
                yield SqliteWriter(conn)
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    async def analyze(self) -> None:
        # SQLite's own advice after large changes: it analyses only the tables whose statistics are out of date.
        async with self.transaction() as writer:
            await writer.conn.execute("PRAGMA optimize")

    async def close(self) -> None:
        try:
            await self.db.close()
        finally:
            if self._in_use is not None:
                self._in_use.release()
                self._in_use = None
