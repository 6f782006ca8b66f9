"""The PostgreSQL store's part of exports: dump every row as export records through a server-side cursor (a few
hundred rows in memory at a time), and load records into a write transaction. Audit entries keep their sequence
numbers; the sequence then continues after the highest."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from psycopg import AsyncConnection
from psycopg.rows import DictRow

from sage_server.store.export_records import KINDS, ExportRecord, Kind
from sage_server.store.export_rows import CLEAR, COUNTS, DUMP, LOAD, SET_META, load_params, meta_params, to_record
from sage_server.store.rows import section_rows

_LOAD = {**LOAD, "audit": LOAD["audit"].replace(") VALUES (", ") OVERRIDING SYSTEM VALUE VALUES (", 1)}
_SECTION_INSERT = "INSERT INTO sections (doc_key, ord, heading, start, length, tokens) VALUES (%s, %s, %s, %s, %s, %s)"
_AUDIT_SEQUENCE = "SELECT setval(pg_get_serial_sequence('audit', 'seq'), coalesce(max(seq), 0) + 1, false) FROM audit"
ROWS_AT_ONCE = 500


class PostgresDump:
    """Export reads on a PostgreSQL connection, inside one snapshot."""

    conn: AsyncConnection[DictRow]

    async def counts(self) -> dict[Kind, int]:
        cursor = await self.conn.execute(COUNTS)
        row = await cursor.fetchone()
        assert row is not None
        return {kind: int(row[kind]) for kind in KINDS}

    async def dump(self, kind: Kind) -> AsyncIterator[ExportRecord]:
        async with self.conn.cursor(name=f"sage_export_{kind}") as cursor:
            cursor.itersize = ROWS_AT_ONCE
            await cursor.execute(DUMP[kind])
            async for row in cursor:
                yield to_record(kind, row)


class PostgresLoad(PostgresDump):
    """Export loads inside a PostgreSQL write transaction."""

    async def clear(self) -> None:
        for sql in CLEAR:
            await self.conn.execute(sql)

    async def load(self, records: Sequence[ExportRecord]) -> None:
        params = load_params(records)
        async with self.conn.cursor() as cursor:
            for kind in KINDS:
                if params[kind]:
                    await cursor.executemany(_LOAD[kind], params[kind])
            live = [p for p in params["document"] if p["deleted_at"] is None]
            if live:
                await cursor.execute("SELECT id, key FROM documents WHERE id = ANY(%s)", ([p["id"] for p in live],))
                keys = {row["id"]: row["key"] for row in await cursor.fetchall()}
                sections = [row for p in live for row in section_rows(keys[p["id"]], p["body"])]
                await cursor.executemany(_SECTION_INSERT, sections)

    async def finish_load(self, database_id: str, created_at: str, generation: int) -> None:
        async with self.conn.cursor() as cursor:
            await cursor.executemany(SET_META, meta_params(database_id, created_at, generation))
        await self.conn.execute(_AUDIT_SEQUENCE)
