"""The PostgreSQL store's sessions: the same reads and writes as sqlite_documents.py, in PostgreSQL's SQL (the
full-text reads are in postgres_search.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import DictRow, tuple_row

from sage_server.models import ApiKey, AuditEntry, Change, DocumentIn, Revision
from sage_server.store.postgres_export import PostgresDump, PostgresLoad
from sage_server.store.postgres_search import PostgresSearch, filter_sql
from sage_server.store.records import (
    CHANGE_IDS,
    CHANGE_RETENTION,
    EVERYTHING,
    PRUNE_EVERY,
    ChangeLog,
    DocumentPage,
    DocumentRef,
    Essential,
    ImportCandidate,
    LayerTotal,
    SectionText,
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

DOCUMENT_COLUMNS = (
    "key, id, title, layer, tags, triggers, summary, body, related, aliases, translations, source_path, source_hash, "
    "content_hash, tokens, revision, change, created_at, updated_at, deleted_at"
)
CONTENT_COLUMNS = "title, layer, tags, triggers, summary, body, related, aliases, translations"
# The columns a new document's row sets, written with COPY (insert_many).
NEW_DOCUMENT_COLUMNS = (
    "id", "title", "layer", "tags", "triggers", "summary", "body", "related", "aliases", "translations", "headings",
    "cjk", "alt_titles", "alt_summaries", "source_path", "source_hash", "source_stat", "content_hash", "tokens",
    "revision", "change", "created_at", "updated_at",
)  # fmt: skip
# Documents written per COPY statement: the index trigger runs once per statement (migration 0004), on this many
# documents at once, and its working set (their parsed fields) stays a few MB.
COPY_DOCUMENTS = 1000
SECTION_COLUMNS = "doc_key, ord, heading, start, length, tokens"
KEY_COLUMNS = "name, digest, scope, created_at, expires_at, revoked_at"
AUDIT_COLUMNS = "at, key_name, client, operation, target, revision, outcome, count, detail"

_RECORD_CHANGES = """
INSERT INTO changes (generation, doc_id, layer, listed)
SELECT %(generation)s, d.id, d.layer,
       p.doc_key IS NULL OR p.deleted <> (d.deleted_at IS NOT NULL) OR p.layer <> d.layer OR p.title <> d.title
       OR p.summary <> d.summary
FROM documents AS d LEFT JOIN revisions AS p ON p.doc_key = d.key AND p.revision = d.revision - 1
WHERE d.id = ANY(%(ids)s)
UNION ALL
SELECT %(generation)s, d.id, p.layer, TRUE
FROM documents AS d JOIN revisions AS p ON p.doc_key = d.key AND p.revision = d.revision - 1
WHERE d.id = ANY(%(ids)s) AND p.layer <> d.layer
"""

Connection = AsyncConnection[DictRow]
CHANNEL = "sage_generation"  # every committed write NOTIFYs its generation here (see PostgresStore.watch)


def _insert_row(doc: DocumentIn, source: Source, now: str) -> tuple[object, ...]:
    """A new document's values, in the order of NEW_DOCUMENT_COLUMNS."""
    values = {
        **document_fields(doc),
        "id": doc.id,
        **source_fields(source),
        "revision": 1,
        "change": "create",
        "created_at": now,
        "updated_at": now,
    }
    return tuple(values[name] for name in NEW_DOCUMENT_COLUMNS)


class PostgresReader(PostgresDump, PostgresSearch):
    """Reads on one PostgreSQL connection, inside one snapshot."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def _row(self, sql: str, params: Any = None) -> DictRow | None:
        cursor = await self.conn.execute(sql, params)
        return await cursor.fetchone()

    async def _rows(self, sql: str, params: Any = None) -> list[DictRow]:
        cursor = await self.conn.execute(sql, params)
        return await cursor.fetchall()

    async def document(self, doc_id: str) -> StoredDocument | None:
        return stored(await self._row(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE id = %s", (doc_id,)))

    async def document_by_alias(self, alias: str) -> StoredDocument | None:
        return stored(
            await self._row(
                f"SELECT {DOCUMENT_COLUMNS} FROM documents "
                "WHERE key = (SELECT doc_key FROM aliases WHERE alias = %s) AND deleted_at IS NULL",
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
            "WHERE doc_key = %s ORDER BY revision DESC",
            (doc.ref.key,),
        )
        return [newest, *(Revision(id=current.id, **row) for row in rows)]

    async def revision_content(self, doc: StoredDocument, revision: int) -> DocumentIn | None:
        if revision == doc.ref.revision:
            return DocumentIn.model_validate(doc.document.model_dump(include=set(DocumentIn.model_fields)))
        row = await self._row(
            f"SELECT {CONTENT_COLUMNS} FROM revisions WHERE doc_key = %s AND revision = %s", (doc.ref.key, revision)
        )
        return None if row is None else to_content(doc.ref.id, row)

    async def list_documents(
        self, layers: list[str] | None, tags: list[str] | None, limit: int, offset: int
    ) -> DocumentPage:
        where, params = filter_sql(layers, tags)
        page = await self._rows(
            f"SELECT {DOCUMENT_COLUMNS} FROM documents d WHERE d.deleted_at IS NULL{where} "
            "ORDER BY d.layer, d.id LIMIT %s OFFSET %s",
            [*params, limit + 1, offset],
        )
        total = await self._row(f"SELECT count(*) AS n FROM documents d WHERE d.deleted_at IS NULL{where}", params)
        return DocumentPage(items=[to_summary(row) for row in page], total=total["n"] if total else 0)

    async def ids_from(self, prefix: str, limit: int) -> list[str]:
        rows = await self._rows(
            "SELECT id FROM documents WHERE deleted_at IS NULL AND starts_with(id, %s) ORDER BY id LIMIT %s",
            (prefix, limit),
        )
        return [row["id"] for row in rows]

    async def layer_totals(self) -> list[LayerTotal]:
        rows = await self._rows(
            "SELECT layer, count(*) AS documents, coalesce(sum(tokens), 0) AS tokens FROM documents "
            "WHERE deleted_at IS NULL GROUP BY layer"
        )
        return [LayerTotal(row["layer"], int(row["documents"]), int(row["tokens"])) for row in rows]

    async def has_live_documents(self) -> bool:
        return await self._row("SELECT 1 FROM documents WHERE deleted_at IS NULL LIMIT 1") is not None

    async def import_candidates(self, ids: list[str]) -> dict[str, ImportCandidate]:
        # Plain tuples, not the connection's dicts: import_candidate reads them by position.
        async with self.conn.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(
                f"SELECT {IMPORT_COLUMNS} FROM documents WHERE source_path IS NOT NULL OR id = ANY(%s)", (ids,)
            )
            rows = await cursor.fetchall()
        return {row[1]: import_candidate(row) for row in rows}

    async def taken_ids(self, ids: list[str]) -> set[str]:
        rows = await self._rows("SELECT id FROM documents WHERE id = ANY(%s)", (ids,))
        return {row["id"] for row in rows}

    async def generation(self) -> int:
        row = await self._row("SELECT value FROM meta WHERE key = 'generation'")
        return int(row["value"]) if row else 0

    async def identity(self) -> tuple[str, datetime]:
        rows = await self._rows("SELECT key, value FROM meta WHERE key IN ('database_id', 'created_at')")
        meta = {row["key"]: row["value"] for row in rows}
        try:
            created = datetime.fromisoformat(meta["created_at"])
        except ValueError:  # only ever read for the age of the newest backup: a bad value must not stop the server
            created = datetime.now(UTC)
        return meta["database_id"], created

    async def changes_after(self, generation: int, limit: int) -> ChangeLog:
        # The reader's snapshot (REPEATABLE READ) makes the newest generation and the rows agree.
        newest = await self.generation()
        found = await self._rows(
            "SELECT generation, doc_id, layer, listed FROM changes WHERE generation > %s ORDER BY generation LIMIT %s",
            (generation, limit + 1),
        )
        rows = [(int(r["generation"]), str(r["doc_id"]), r["layer"], bool(r["listed"])) for r in found]
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
            f"SELECT seq, {AUDIT_COLUMNS} FROM audit WHERE at >= %s AND seq > %s ORDER BY seq LIMIT %s",
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

    async def essentials(self, layer: str) -> list[Essential]:
        rows = await self._rows(
            "SELECT id, title, summary FROM documents WHERE layer = %s AND deleted_at IS NULL ORDER BY id", (layer,)
        )
        return [Essential(r["id"], r["title"], r["summary"]) for r in rows]

    async def sections_of(self, keys: list[int]) -> list[SectionText]:
        rows = await self._rows(
            "SELECT s.doc_key, s.ord, s.heading, substr(d.body, s.start + 1, s.length) AS text "
            "FROM sections s JOIN documents d ON d.key = s.doc_key WHERE s.doc_key = ANY(%s) ORDER BY s.doc_key, s.ord",
            (keys,),
        )
        return [SectionText(r["doc_key"], r["ord"], r["heading"], r["text"]) for r in rows]


class PostgresWriter(PostgresLoad, PostgresReader):
    """One write transaction (writers take one lock, so they run one at a time across instances, as on SQLite)."""

    async def insert_many(self, items: list[tuple[DocumentIn, Source]]) -> None:
        # COPY, a chunk of documents per statement: the search index is kept per statement (migration 0004), so a
        # chunk is parsed and indexed in one pass instead of one trigger call per document.
        now = now_iso()
        rebuild = len(items) >= COPY_DOCUMENTS and len(items) >= await self.document_count()
        if rebuild:  # a bulk load into a small index: its B-trees are built again once loaded (migration 0004)
            await self.conn.execute("SELECT sage_search_terms_unindex()")
        for start in range(0, len(items), COPY_DOCUMENTS):
            chunk = items[start : start + COPY_DOCUMENTS]
            async with self.conn.cursor() as cursor:
                async with cursor.copy(f"COPY documents ({', '.join(NEW_DOCUMENT_COLUMNS)}) FROM STDIN") as copy:
                    for doc, source in chunk:
                        await copy.write_row(_insert_row(doc, source, now))
            found = await self._rows(
                "SELECT id, key FROM documents WHERE id = ANY(%s)", ([doc.id for doc, _ in chunk],)
            )
            keys: dict[str, int] = {row["id"]: row["key"] for row in found}
            await self._copy_sections([row for doc, _ in chunk for row in section_rows(keys[doc.id], doc.body)])
            await self._set_aliases([(keys[doc.id], doc.aliases) for doc, _ in chunk if doc.aliases])
        if rebuild:
            await self.conn.execute("SELECT sage_search_terms_reindex()")

    async def _copy_sections(self, rows: list[tuple[int, int, str, int, int, int]]) -> None:
        async with self.conn.cursor() as cursor:
            async with cursor.copy(f"COPY sections ({SECTION_COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    await copy.write_row(row)

    async def _set_aliases(self, rows: list[tuple[int, list[str]]]) -> None:
        """Point each document's aliases at it. An alias another document claimed first stays with that one."""
        async with self.conn.cursor() as cursor:
            await cursor.executemany("DELETE FROM aliases WHERE doc_key = %s", [(key,) for key, _ in rows])
            await cursor.executemany(
                "INSERT INTO aliases (alias, doc_key) VALUES (%s, %s) ON CONFLICT (alias) DO NOTHING",
                [(alias, key) for key, aliases in rows for alias in aliases],
            )

    async def _archive(self, target: DocumentRef) -> None:
        await self.conn.execute(
            f"INSERT INTO revisions (doc_key, revision, change, {CONTENT_COLUMNS}, source_path, content_hash, tokens, "
            "created_at, deleted) "
            f"SELECT key, revision, change, {CONTENT_COLUMNS}, source_path, content_hash, tokens, updated_at, "
            "deleted_at IS NOT NULL FROM documents WHERE key = %s",
            (target.key,),
        )

    async def replace(self, ref: DocumentRef, doc: DocumentIn, source: Source, change: Change) -> None:
        await self._archive(ref)
        await self.conn.execute("DELETE FROM sections WHERE doc_key = %s", (ref.key,))
        await self.conn.execute(
            "UPDATE documents SET title = %(title)s, layer = %(layer)s, tags = %(tags)s, triggers = %(triggers)s, "
            "summary = %(summary)s, body = %(body)s, related = %(related)s, aliases = %(aliases)s, "
            "translations = %(translations)s, headings = %(headings)s, cjk = %(cjk)s, alt_titles = %(alt_titles)s, "
            "alt_summaries = %(alt_summaries)s, source_path = %(source_path)s, source_hash = %(source_hash)s, "
            "source_stat = %(source_stat)s, content_hash = %(content_hash)s, tokens = %(tokens)s, "
            "revision = revision + 1, change = %(change)s, updated_at = %(now)s, deleted_at = NULL WHERE key = %(key)s",
            {
                **document_fields(doc),
                **source_fields(source),
                "change": change,
                "now": now_iso(),
                "key": ref.key,
            },
        )
        await self._copy_sections(section_rows(ref.key, doc.body))
        await self._set_aliases([(ref.key, doc.aliases)])

    async def set_source_stats(self, stats: list[tuple[DocumentRef, str | None]]) -> None:
        # Not a searched column: the full-text trigger does not fire.
        async with self.conn.cursor() as cursor:
            await cursor.executemany(
                "UPDATE documents SET source_stat = %s WHERE key = %s", [(stat, ref.key) for ref, stat in stats]
            )

    async def soft_delete(self, ref: DocumentRef, change: Change) -> None:
        await self._archive(ref)
        await self.conn.execute("DELETE FROM sections WHERE doc_key = %s", (ref.key,))
        now = now_iso()
        await self.conn.execute(
            "UPDATE documents SET revision = revision + 1, change = %s, updated_at = %s, deleted_at = %s "
            "WHERE key = %s",
            (change, now, now, ref.key),
        )

    async def purge(self, ref: DocumentRef) -> None:
        await self.conn.execute("DELETE FROM documents WHERE key = %s", (ref.key,))

    async def bump_generation(self, changed: list[str] | None = None) -> int:
        row = await self._row(
            "UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'generation' RETURNING value"
        )
        assert row is not None
        generation = int(row["value"])
        if changed is None or len(changed) > CHANGE_IDS:
            await self.conn.execute(
                "INSERT INTO changes (generation, doc_id, layer, listed) VALUES (%s, %s, NULL, TRUE)",
                (generation, EVERYTHING),
            )
        elif changed:
            await self.conn.execute(_RECORD_CHANGES, {"generation": generation, "ids": list(changed)})
        if generation % PRUNE_EVERY == 0:
            await self.conn.execute("DELETE FROM changes WHERE generation <= %s", (generation - CHANGE_RETENTION,))
        await self.conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(generation)))  # sent at commit
        return generation

    async def insert_key(self, name: str, digest: str, scope: str, expires_at: str | None) -> bool:
        row = await self._row(
            f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, NULL) ON CONFLICT (name) DO NOTHING "
            "RETURNING name",
            (name, digest, scope, now_iso(), expires_at),
        )
        return row is not None

    async def revoke_key(self, name: str) -> bool:
        row = await self._row(
            "UPDATE api_keys SET revoked_at = %s WHERE name = %s AND revoked_at IS NULL RETURNING name",
            (now_iso(), name),
        )
        return row is not None

    async def insert_audit(self, rows: list[tuple[object, ...]]) -> None:
        async with self.conn.cursor() as cursor:
            await cursor.executemany(
                f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows
            )

    async def add_auth_failures(self, rows: list[tuple[str, str, str, int]]) -> None:
        for minute, client, reason, count in rows:
            updated = await self._row(
                "UPDATE audit SET count = count + %s WHERE operation = 'authenticate' AND at = %s AND client = %s "
                "AND outcome = %s RETURNING seq",
                (count, minute, client, reason),
            )
            if updated is None:
                entry = (minute, "anonymous", client, "authenticate", None, None, reason, count, "{}")
                await self.insert_audit([entry])

    async def prune_audit(self, before: str) -> int:
        return len(await self._rows("DELETE FROM audit WHERE at < %s RETURNING seq", (before,)))
