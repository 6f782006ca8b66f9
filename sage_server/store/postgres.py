"""The PostgreSQL store: a pool of psycopg 3 connections shared by every instance pointed at one database.

Reads run in a REPEATABLE READ, READ ONLY transaction (one snapshot, as a SQLite reader sees). Writes take one
transaction-scoped advisory lock first, so they run one at a time across every instance, as SQLite's BEGIN
IMMEDIATE makes them: an optimistic-concurrency check and the write it guards cannot interleave with another
instance's, and two imports at once never create a document twice. A deadline that cancels a query cancels it on
the server too (psycopg sends the cancel request).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from sage_server.errors import MigrationError, Unavailable
from sage_server.logs import get_logger, log_event
from sage_server.resources import migrations_dir
from sage_server.store.migrations import pending
from sage_server.store.postgres_documents import CHANNEL, PostgresReader, PostgresWriter

log = get_logger("store")

# Advisory lock keys (any two 64-bit numbers SAGE alone uses): one held while migrating, one by each write.
MIGRATION_LOCK = 0x5A6E_0001
WRITE_LOCK = 0x5A6E_0002
JOB_LOCK = 0x5A6E_0003  # held by the one instance running the backup job, on a connection of its own
CONNECT_SECONDS = 10.0
WATCH_RETRY_SECONDS = 1.0
CLOSING_SECONDS = 5.0  # how long a client that just disconnected may still be listed as connected
SERVER_GRACE = 0.25  # seconds past a deadline before the server stops the query itself

_TRACKING = """CREATE TABLE IF NOT EXISTS schema_migrations (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""


def postgres_migrations() -> Path:
    """The PostgreSQL migrations (migrations/postgresql/NNNN_name.sql)."""
    return migrations_dir() / "postgresql"


def redacted(url: str) -> str:
    """The URL without its password, to show and log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _unavailable(url: str, exc: BaseException) -> Unavailable:
    return Unavailable(f"database error ({redacted(url)}): {exc}", backend="postgresql")


async def migrate(conn: AsyncConnection[DictRow], directory: Path) -> list[str]:
    """Bring the database to the newest migration, each file in a transaction of its own, checked by sha256. An
    advisory lock makes instances that start at once take turns: the first applies, the others find it done."""
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        await conn.execute(_TRACKING)
        cursor = await conn.execute("SELECT name, sha256 FROM schema_migrations")
        applied = {row["name"]: row["sha256"] for row in await cursor.fetchall()}
        done: list[str] = []
        for path, digest in pending(applied, directory):
            try:
                script = path.read_text(encoding="utf-8")
                async with conn.transaction():
                    await conn.execute(script.encode("utf-8"))  # bytes: the script's % signs are not placeholders
                    await conn.execute(
                        "INSERT INTO schema_migrations (name, sha256, applied_at) VALUES (%s, %s, %s)",
                        (path.name, digest, datetime.now(UTC).isoformat()),
                    )
            except (psycopg.Error, UnicodeDecodeError) as exc:
                raise MigrationError(f"{path}: {exc}", migration=path.name) from exc
            done.append(path.name)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


class PostgresStore:
    """A knowledge base in a PostgreSQL database."""

    backend: Literal["postgresql"] = "postgresql"
    path: Path | None = None
    searchable = True

    def __init__(self, url: str, pool_size: int = 10, migrations: Path | None = None) -> None:
        self.url = url
        # Every connection says it is SAGE's (pg_stat_activity shows it), and which store it belongs to, so
        # other_sessions() can leave this one's own connections out.
        self.application_name = f"sage:{uuid.uuid4().hex[:8]}"
        self.migrations = migrations or postgres_migrations()
        self.pool: AsyncConnectionPool[AsyncConnection[DictRow]] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            # Each session says BEGIN and COMMIT itself. No JIT: it compiles for seconds when a freshly written table's
            # statistics make a millisecond search look costly.
            kwargs={
                "row_factory": dict_row,
                "autocommit": True,
                "application_name": self.application_name,
                "options": "-c jit=off",
            },
            connection_class=AsyncConnection[DictRow],
            timeout=CONNECT_SECONDS,
        )

    @property
    def location(self) -> str:
        return redacted(self.url)

    async def open(self) -> list[str]:
        try:
            async with await AsyncConnection.connect(
                self.url, autocommit=True, row_factory=dict_row, connect_timeout=int(CONNECT_SECONDS)
            ) as conn:
                applied = await migrate(conn, self.migrations)
            await self.pool.open(wait=True, timeout=CONNECT_SECONDS)
        except (psycopg.Error, PoolTimeout) as exc:
            await self.pool.close()
            raise Unavailable(f"cannot use database {redacted(self.url)}: {exc}", backend="postgresql") from exc
        return applied

    async def watch(self, seen: Callable[[int], None]) -> None:
        # A connection of its own, outside the pool, LISTENing for the generation every write NOTIFYs at commit; a
        # lost connection is opened again (the service's poll covers the gap).
        while True:
            try:
                # Shielded: a connect cancelled half-way (the service closing just after it opened) would leave the
                # server's end open until the socket is garbage-collected, seen by restore as another client.
                with anyio.CancelScope(shield=True):
                    listener = await AsyncConnection.connect(
                        self.url,
                        autocommit=True,
                        connect_timeout=int(CONNECT_SECONDS),
                        application_name=self.application_name,
                    )
                async with listener as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Writes committed before the LISTEN took hold are told by the generation they left.
                    cursor = await conn.execute("SELECT value FROM meta WHERE key = 'generation'")
                    row = await cursor.fetchone()
                    seen(int(row[0]) if row else 0)
                    async for note in conn.notifies():
                        seen(int(note.payload))
            except (psycopg.Error, ValueError) as exc:
                log_event(log, logging.WARNING, "Listening for writes failed", operation="watch", error=str(exc))
            await anyio.sleep(WATCH_RETRY_SECONDS)

    async def analyze(self) -> None:
        # Search plans rely on these tables' statistics: until autovacuum analyses freshly imported rows (a minute
        # or so later), the first searches after a large import were planned for empty tables and took seconds.
        async with self.pool.connection() as conn:
            await conn.execute("ANALYZE documents, search_terms, search_documents")

    @asynccontextmanager
    async def _session(self, begin: str) -> AsyncIterator[AsyncConnection[DictRow]]:
        """A pooled connection inside one transaction, committed when the block ends and rolled back when it raises.

        Under a deadline (an anyio cancel scope) the transaction's statements get the time left as their
        statement_timeout, plus SERVER_GRACE so the deadline fires first: when the caller stops waiting, the server
        stops the query too. The cancelled connection is closed (the pool opens another)."""
        try:
            async with self.pool.connection() as conn:
                await conn.execute(begin)
                deadline = anyio.current_effective_deadline()
                if deadline != math.inf:
                    left_ms = max(1, round((deadline - anyio.current_time() + SERVER_GRACE) * 1000))
                    await conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(left_ms),))
                try:
                    yield conn
                except anyio.get_cancelled_exc_class():
                    with anyio.CancelScope(shield=True):
                        await conn.close()
                    raise
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await conn.execute("ROLLBACK")
                    raise
                else:
                    await conn.execute("COMMIT")
        except (psycopg.Error, PoolTimeout) as exc:
            raise _unavailable(self.url, exc) from exc

    @asynccontextmanager
    async def read(self) -> AsyncIterator[PostgresReader]:
        async with self._session("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") as conn:
            yield PostgresReader(conn)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[PostgresReader]:
        async with self.read() as reader:  # a read is one snapshot already (REPEATABLE READ)
            yield reader

    @asynccontextmanager
    async def job_lock(self, folder: Path) -> AsyncIterator[bool]:
        # A session lock on a connection of its own, held while the block runs; if this instance dies, its
        # connection closes and the lock is free for another.
        try:
            conn = await AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=int(CONNECT_SECONDS), application_name=self.application_name
            )
        except psycopg.Error as exc:
            raise _unavailable(self.url, exc) from exc
        try:
            try:
                cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (JOB_LOCK,))
                row = await cursor.fetchone()
            except psycopg.Error as exc:
                raise _unavailable(self.url, exc) from exc
            yield bool(row and row[0])
        finally:
            with anyio.CancelScope(shield=True):  # closed even when cancelled: that is what lets the lock go
                await conn.close()

    async def other_sessions(self) -> list[str]:
        # A client that has just disconnected stays listed until its server process has exited (moments later):
        # ask again for a little while before answering that others are connected.
        rows = await self._other_sessions()
        with anyio.move_on_after(CLOSING_SECONDS):
            while rows:
                await anyio.sleep(0.1)
                rows = await self._other_sessions()
        return [f"{row['application_name'] or 'unnamed'} ({row['address'] or 'local socket'})" for row in rows]

    async def _other_sessions(self) -> list[DictRow]:
        async with self.read() as reader:
            return await reader._rows(
                "SELECT application_name, client_addr::text AS address FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                "AND application_name <> %s ORDER BY application_name",
                (self.application_name,),
            )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresWriter]:
        async with self._session("BEGIN") as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield PostgresWriter(conn)

    async def close(self) -> None:
        await self.pool.close()
