"""The SQLite store's sessions: document rows where every change archives the old revision and deletes are soft
until purged, the generation and change log, keys and the audit trail."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from typing import Any

import aiosqlite

from sage_server.models import ApiKey, AuditEntry, Change, DocumentIn, Revision
from sage_server.store.records import (
    CHANGE_IDS,
    CHANGE_RETENTION,
    EVERYTHING,
    PRUNE_EVERY,
    ChangeLog,
    DocumentPage,
    DocumentRef,
    ImportCandidate,
    LayerTotal,
    Source,
    StoredDocument,
    StoredKey,
    now_iso,
)
from sage_server.store.rows import (
    IMPORT_COLUMNS,
    document_fields,
    import_candidate,
    section_rows,
    source_fields,
    stored,
    to_content,
    to_summary,
)
from sage_server.store.sqlite_export import SqliteDump, SqliteLoad
from sage_server.store.sqlite_search import SqliteSearch, filter_sql

DOCUMENT_COLUMNS = (
    "key, id, title, layer, tags, triggers, summary, body, related, aliases, translations, source_path, source_hash, "
    "content_hash, tokens, revision, change, created_at, updated_at, deleted_at"
)
# The content of a document as a revision keeps it (the rest of a documents row is derived or bookkeeping).
CONTENT_COLUMNS = "title, layer, tags, triggers, summary, body, related, aliases, translations"


DOCUMENT_INSERT = (
    "INSERT INTO documents (key, id, title, layer, tags, triggers, summary, body, related, aliases, translations, "
    "headings, cjk, alt_titles, alt_summaries, source_path, source_hash, source_stat, content_hash, tokens, revision, "
    "change, created_at, updated_at) "
    "VALUES (:key, :id, :title, :layer, :tags, :triggers, :summary, :body, :related, :aliases, :translations, "
    ":headings, :cjk, :alt_titles, :alt_summaries, :source_path, :source_hash, :source_stat, :content_hash, :tokens, "
    "1, 'create', :now, :now)"
)
# An import's survey of the store: read from the index documents_import alone (migration 0006), never the bodies.
IMPORT_CANDIDATES = (
    f"SELECT {IMPORT_COLUMNS} FROM documents WHERE source_path IS NOT NULL OR id IN (SELECT value FROM json_each(?))"
)
# A bulk insert's rows indexed at once, from the first key it gave (see insert_many).
INDEX_FROM_KEY = (
    "INSERT INTO docs_fts (rowid, title, tags, triggers, summary, headings, body, cjk) "
    "SELECT key, title, tags, triggers, summary, headings, body, cjk FROM indexed_documents WHERE key >= ?"
)
SECTION_INSERT = "INSERT INTO sections (doc_key, ord, heading, start, length, tokens) VALUES (?, ?, ?, ?, ?, ?)"


# One row per changed document with the layer it is in now, whether its listing entry changed (new, deleted,
# undeleted, retitled, resummarised or moved), and a second row with the layer it left when it moved.
_RECORD_CHANGES = """
INSERT INTO changes (generation, doc_id, layer, listed)
SELECT :generation, d.id, d.layer,
       p.doc_key IS NULL OR p.deleted <> (d.deleted_at IS NOT NULL) OR p.layer <> d.layer OR p.title <> d.title
       OR p.summary <> d.summary
FROM documents AS d LEFT JOIN revisions AS p ON p.doc_key = d.key AND p.revision = d.revision - 1
WHERE d.id IN (SELECT value FROM json_each(:ids))
UNION ALL
SELECT :generation, d.id, p.layer, 1
FROM documents AS d JOIN revisions AS p ON p.doc_key = d.key AND p.revision = d.revision - 1
WHERE d.id IN (SELECT value FROM json_each(:ids)) AND p.layer <> d.layer
"""

KEY_COLUMNS = "name, digest, scope, created_at, expires_at, revoked_at"
AUDIT_COLUMNS = "at, key_name, client, operation, target, revision, outcome, count, detail"


class SqliteReader(SqliteDump, SqliteSearch):
    """Reads on one SQLite connection."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def _row(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        async with self.conn.execute(sql, params) as cursor:
            row: sqlite3.Row | None = await cursor.fetchone()
            return row

    async def _rows(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        async with self.conn.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def document(self, doc_id: str) -> StoredDocument | None:
        return stored(await self._row(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE id = ?", (doc_id,)))

    async def document_by_alias(self, alias: str) -> StoredDocument | None:
        return stored(
            await self._row(
                f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE key = (SELECT doc_key FROM aliases WHERE alias = ?) "
                "AND deleted_at IS NULL",
                (alias,),
            )
        )

    async def revisions(self, doc: StoredDocument) -> list[Revision]:
        current = doc.document
        newest = Revision(
            id=current.id,
            revision=current.revision,
            change=doc.change,
            title=current.title,
            layer=current.layer,
            content_hash=current.content_hash,
            tokens=current.tokens,
            source_path=current.source_path,
            created_at=current.updated_at,
        )
        rows = await self._rows(
            "SELECT revision, change, title, layer, content_hash, tokens, source_path, created_at FROM revisions "
            "WHERE doc_key = ? ORDER BY revision DESC",
            (doc.ref.key,),
        )
        older = [
            Revision(
                id=current.id,
                revision=r["revision"],
                change=r["change"],
                title=r["title"],
                layer=r["layer"],
                content_hash=r["content_hash"],
                tokens=r["tokens"],
                source_path=r["source_path"],
                created_at=r["created_at"],
            )
            for r in rows
        ]
        return [newest, *older]

    async def revision_content(self, doc: StoredDocument, revision: int) -> DocumentIn | None:
        if revision == doc.ref.revision:
            current = doc.document
            return DocumentIn.model_validate(current.model_dump(include=set(DocumentIn.model_fields)))
        row = await self._row(
            f"SELECT {CONTENT_COLUMNS} FROM revisions WHERE doc_key = ? AND revision = ?", (doc.ref.key, revision)
        )
        return None if row is None else to_content(doc.ref.id, row)

    async def list_documents(
        self, layers: list[str] | None, tags: list[str] | None, limit: int, offset: int
    ) -> DocumentPage:
        where, params = filter_sql(layers, tags)
        page = await self._rows(
            f"SELECT {DOCUMENT_COLUMNS} FROM documents d WHERE d.deleted_at IS NULL{where} "
            "ORDER BY d.layer, d.id LIMIT ? OFFSET ?",
            [*params, limit + 1, offset],
        )
        total = await self._row(f"SELECT count(*) FROM documents d WHERE d.deleted_at IS NULL{where}", params)
        return DocumentPage(items=[to_summary(row) for row in page], total=total[0] if total else 0)

    async def ids_from(self, prefix: str, limit: int) -> list[str]:
        rows = await self._rows(
            "SELECT id FROM documents WHERE deleted_at IS NULL AND id >= ? AND id < ? LIMIT ?",
            (prefix, prefix + "\uffff", limit),
        )
        return [row[0] for row in rows]

    async def layer_totals(self) -> list[LayerTotal]:
        rows = await self._rows(
            "SELECT layer, count(*), coalesce(sum(tokens), 0) FROM documents WHERE deleted_at IS NULL GROUP BY layer"
        )
        return [LayerTotal(row[0], row[1], row[2]) for row in rows]

    async def has_live_documents(self) -> bool:
        return await self._row("SELECT 1 FROM documents WHERE deleted_at IS NULL LIMIT 1") is not None

    async def import_candidates(self, ids: list[str]) -> dict[str, ImportCandidate]:
        # Only the bookkeeping columns (replace and soft_delete need no more): at 100k documents the bodies are 450 MB.
        # Plain tuples, not the connection's sqlite3.Row: import_candidate reads them by position.
        async with self.conn.cursor() as cursor:
            cursor.row_factory = None
            await cursor.execute(IMPORT_CANDIDATES, (json.dumps(ids),))
            rows = await cursor.fetchall()
        return {row[1]: import_candidate(row) for row in rows}

    async def taken_ids(self, ids: list[str]) -> set[str]:
        rows = await self._rows(
            "SELECT id FROM documents WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),)
        )
        return {row[0] for row in rows}

    async def generation(self) -> int:
        row = await self._row("SELECT value FROM meta WHERE key = 'generation'")
        return int(row[0]) if row else 0

    async def identity(self) -> tuple[str, datetime]:
        rows = await self._rows("SELECT key, value FROM meta WHERE key IN ('database_id', 'created_at')")
        meta = {row[0]: row[1] for row in rows}
        try:
            created = datetime.fromisoformat(meta["created_at"])
        except ValueError:  # only ever read for the age of the newest backup: a bad value must not stop the server
            created = datetime.now(UTC)
        return meta["database_id"], created

    async def changes_after(self, generation: int, limit: int) -> ChangeLog:
        # One statement, so one snapshot: the newest generation and the rows agree.
        found = await self._rows(
            "SELECT CAST(value AS INTEGER), NULL, NULL, NULL FROM meta WHERE key = 'generation' "
            "UNION ALL SELECT * FROM (SELECT generation, doc_id, layer, listed FROM changes WHERE generation > ? "
            "ORDER BY generation LIMIT ?)",
            (generation, limit + 1),
        )
        newest = next((int(r[0]) for r in found if r[1] is None), 0)
        rows = [(int(r[0]), str(r[1]), r[2], bool(r[3])) for r in found if r[1] is not None]
        complete = len(rows) <= limit and generation >= newest - CHANGE_RETENTION
        return ChangeLog(newest=newest, rows=rows[:limit], complete=complete)

    async def keys(self) -> list[StoredKey]:
        rows = await self._rows(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, name")
        return [
            StoredKey(
                key=ApiKey(
                    name=row["name"],
                    scope=row["scope"],
                    created_at=row["created_at"],
                    expires_at=row["expires_at"],
                    revoked_at=row["revoked_at"],
                ),
                digest=row["digest"],
            )
            for row in rows
        ]

    async def audit_entries(self, since: str, after: int, limit: int) -> list[AuditEntry]:
        rows = await self._rows(
            f"SELECT seq, {AUDIT_COLUMNS} FROM audit WHERE at >= ? AND seq > ? ORDER BY seq LIMIT ?",
            (since, after, limit),
        )
        return [
            AuditEntry(
                seq=row["seq"],
                at=row["at"],
                key=row["key_name"],
                client=row["client"],
                operation=row["operation"],
                target=row["target"],
                revision=row["revision"],
                outcome=row["outcome"],
                count=row["count"],
                detail=json.loads(row["detail"]),
            )
            for row in rows
        ]


class SqliteWriter(SqliteLoad, SqliteReader):
    """One write transaction on the SQLite writer connection."""

    async def insert_many(self, items: list[tuple[DocumentIn, Source]]) -> None:
        # A few statements for any number of documents (an import's new files arrive this way: one round trip to the
        # database thread per document would cost more than indexing them). The rows are indexed in one statement
        # once they are in: FTS5 fed row by row from the insert trigger did twice the work (0005_source_stat.sql).
        if not items:
            return
        now = now_iso()
        found = await self._row("SELECT coalesce(max(key), 0) + 1 FROM documents")
        assert found is not None
        first: int = found[0]
        rows: list[dict[str, Any]] = []
        sections: list[tuple[int, int, str, int, int, int]] = []
        for key, (doc, source) in enumerate(items, start=first):
            rows.append({**document_fields(doc), "key": key, "id": doc.id, **source_fields(source), "now": now})
            sections += section_rows(key, doc.body)  # right after the fields: the body's headings are found once
        await self.conn.execute("INSERT INTO meta (key, value) VALUES ('index_later', '1')")
        try:
            await self.conn.executemany(DOCUMENT_INSERT, rows)
        finally:
            await self.conn.execute("DELETE FROM meta WHERE key = 'index_later'")
        await self.conn.execute(INDEX_FROM_KEY, (first,))
        await self.conn.executemany(SECTION_INSERT, sections)
        await self._set_aliases([(key, doc.aliases) for key, (doc, _) in enumerate(items, start=first) if doc.aliases])

    async def _set_aliases(self, rows: list[tuple[int, list[str]]]) -> None:
        """Point each document's aliases at it. An alias another document claimed first stays with that one."""
        await self.conn.executemany("DELETE FROM aliases WHERE doc_key = ?", [(key,) for key, _ in rows])
        await self.conn.executemany(
            "INSERT OR IGNORE INTO aliases (alias, doc_key) VALUES (?, ?)",
            [(alias, key) for key, aliases in rows for alias in aliases],
        )

    async def _archive(self, ref: DocumentRef) -> None:
        await self.conn.execute(
            f"INSERT INTO revisions (doc_key, revision, change, {CONTENT_COLUMNS}, source_path, content_hash, tokens, "
            "created_at, deleted) "
            f"SELECT key, revision, change, {CONTENT_COLUMNS}, source_path, content_hash, tokens, updated_at, "
            "deleted_at IS NOT NULL FROM documents WHERE key = ?",
            (ref.key,),
        )

    async def replace(self, ref: DocumentRef, doc: DocumentIn, source: Source, change: Change) -> None:
        await self._archive(ref)
        if not ref.deleted:
            await self.conn.execute("DELETE FROM sections WHERE doc_key = ?", (ref.key,))
        await self.conn.execute(
            "UPDATE documents SET title = :title, layer = :layer, tags = :tags, triggers = :triggers, "
            "summary = :summary, body = :body, related = :related, aliases = :aliases, translations = :translations, "
            "headings = :headings, cjk = :cjk, alt_titles = :alt_titles, alt_summaries = :alt_summaries, "
            "source_path = :source_path, source_hash = :source_hash, source_stat = :source_stat, "
            "content_hash = :content_hash, tokens = :tokens, revision = revision + 1, change = :change, "
            "updated_at = :now, deleted_at = NULL WHERE key = :key",
            {
                **document_fields(doc),
                **source_fields(source),
                "change": change,
                "now": now_iso(),
                "key": ref.key,
            },
        )
        await self.conn.executemany(SECTION_INSERT, section_rows(ref.key, doc.body))
        await self._set_aliases([(ref.key, doc.aliases)])

    async def set_source_stats(self, stats: list[tuple[DocumentRef, str | None]]) -> None:
        # Not indexed columns: the full-text triggers do not fire.
        await self.conn.executemany(
            "UPDATE documents SET source_stat = ? WHERE key = ?", [(stat, ref.key) for ref, stat in stats]
        )

    async def soft_delete(self, ref: DocumentRef, change: Change) -> None:
        await self._archive(ref)
        await self.conn.execute("DELETE FROM sections WHERE doc_key = ?", (ref.key,))
        now = now_iso()
        await self.conn.execute(
            "UPDATE documents SET revision = revision + 1, change = ?, updated_at = ?, deleted_at = ? WHERE key = ?",
            (change, now, now, ref.key),
        )

    async def purge(self, ref: DocumentRef) -> None:
        await self.conn.execute("DELETE FROM documents WHERE key = ?", (ref.key,))

    async def bump_generation(self, changed: list[str] | None = None) -> int:
        row = await self._row(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation' RETURNING value"
        )
        assert row is not None
        generation = int(row[0])
        if changed is None or len(changed) > CHANGE_IDS:
            await self.conn.execute(
                "INSERT INTO changes (generation, doc_id, layer, listed) VALUES (?, ?, NULL, 1)",
                (generation, EVERYTHING),
            )
        elif changed:
            await self.conn.execute(_RECORD_CHANGES, {"generation": generation, "ids": json.dumps(list(changed))})
        if generation % PRUNE_EVERY == 0:
            await self.conn.execute("DELETE FROM changes WHERE generation <= ?", (generation - CHANGE_RETENTION,))
        return generation

    async def insert_key(self, name: str, digest: str, scope: str, expires_at: str | None) -> bool:
        row = await self._row(
            f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (name) DO NOTHING "
            "RETURNING name",
            (name, digest, scope, now_iso(), expires_at),
        )
        return row is not None

    async def revoke_key(self, name: str) -> bool:
        row = await self._row(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL RETURNING name",
            (now_iso(), name),
        )
        return row is not None

    async def insert_audit(self, rows: list[tuple[object, ...]]) -> None:
        await self.conn.executemany(f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    async def add_auth_failures(self, rows: list[tuple[str, str, str, int]]) -> None:
        for minute, client, reason, count in rows:
            updated = await self._row(
                "UPDATE audit SET count = count + ? WHERE operation = 'authenticate' AND at = ? AND client = ? "
                "AND outcome = ? RETURNING seq",
                (count, minute, client, reason),
            )
            if updated is None:
                entry = (minute, "anonymous", client, "authenticate", None, None, reason, count, "{}")
                await self.insert_audit([entry])

    async def prune_audit(self, before: str) -> int:
        return len(await self._rows("DELETE FROM audit WHERE at < ? RETURNING seq", (before,)))
