"""The SQLite store's part of exports: dump every row as export records, and load records into a write transaction
(the full-text index follows by its triggers, sections are cut again)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence

import aiosqlite

from sage_server.store.export_records import KINDS, ExportRecord, Kind
from sage_server.store.export_rows import CLEAR, COUNTS, DUMP, LOAD, SET_META, load_params, meta_params, to_record
from sage_server.store.rows import section_rows


def _named(sql: str) -> str:
    """%(name)s placeholders as SQLite's :name."""
    return re.sub(r"%\((\w+)\)s", r":\1", sql)


_LOAD = {kind: _named(sql) for kind, sql in LOAD.items()}
_SECTION_INSERT = "INSERT INTO sections (doc_key, ord, heading, start, length, tokens) VALUES (?, ?, ?, ?, ?, ?)"


class SqliteDump:
    """Export reads on a SQLite connection (run them inside one read transaction: Store.snapshot)."""

    conn: aiosqlite.Connection

    async def counts(self) -> dict[Kind, int]:
        async with self.conn.execute(COUNTS) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return {kind: int(row[index]) for index, kind in enumerate(KINDS)}

    async def dump(self, kind: Kind) -> AsyncIterator[ExportRecord]:
        async with self.conn.execute(DUMP[kind]) as cursor:  # fetched a few rows at a time, never all at once
            async for row in cursor:
                yield to_record(kind, row)


class SqliteLoad(SqliteDump):
    """Export loads inside a SQLite write transaction."""

    async def clear(self) -> None:
        for sql in CLEAR:
            await self.conn.execute(sql)

    async def load(self, records: Sequence[ExportRecord]) -> None:
        params = load_params(records)
        for kind in KINDS:
            if params[kind]:
                await self.conn.executemany(_LOAD[kind], params[kind])
        live = [p for p in params["document"] if p["deleted_at"] is None]
        if live:
            ids = json.dumps([p["id"] for p in live])
            async with self.conn.execute(
                "SELECT id, key FROM documents WHERE id IN (SELECT value FROM json_each(?))", (ids,)
            ) as cursor:
                keys = {row[0]: row[1] for row in await cursor.fetchall()}
            sections = [row for p in live for row in section_rows(keys[p["id"]], p["body"])]
            await self.conn.executemany(_SECTION_INSERT, sections)

    async def finish_load(self, database_id: str, created_at: str, generation: int) -> None:
        await self.conn.executemany(_named(SET_META), meta_params(database_id, created_at, generation))
