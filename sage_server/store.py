"""Document rows in SQLite: every change archives the old revision; deletes are soft until purged."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiosqlite

from sage_server.markdown import heading_texts, sections
from sage_server.models import Change, Document, DocumentIn, DocumentSummary, Revision
from sage_server.text import cjk_index_text, estimate_tokens

DOCUMENT_COLUMNS = (
    "key, id, title, layer, tags, triggers, summary, body, related, aliases, translations, source_path, source_hash, "
    "content_hash, tokens, revision, change, created_at, updated_at, deleted_at"
)
# The content of a document as a revision keeps it (the rest of a documents row is derived or bookkeeping).
CONTENT_COLUMNS = "title, layer, tags, triggers, summary, body, related, aliases, translations"


DOCUMENT_INSERT = (
    "INSERT INTO documents (id, title, layer, tags, triggers, summary, body, related, aliases, translations, "
    "headings, cjk, alt_titles, alt_summaries, source_path, source_hash, content_hash, tokens, revision, change, "
    "created_at, updated_at) "
    "VALUES (:id, :title, :layer, :tags, :triggers, :summary, :body, :related, :aliases, :translations, "
    ":headings, :cjk, :alt_titles, :alt_summaries, :source_path, :source_hash, :content_hash, :tokens, 1, 'create', "
    ":now, :now)"
)
SECTION_INSERT = "INSERT INTO sections (doc_key, ord, heading, start, length, tokens) VALUES (?, ?, ?, ?, ?, ?)"


def now_iso() -> str:
    """The current UTC time as ISO-8601 text, the form every timestamp is stored in."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def content_hash(doc: DocumentIn) -> str:
    """sha256 over a document's content fields, so an identical save is recognised and not stored twice."""
    fields: list[Any] = [doc.title, doc.layer, doc.tags, doc.triggers, doc.summary, doc.body]
    links = [doc.related, doc.aliases, _translations_json(doc)]
    if any(links):  # only then: documents stored before these fields existed keep the hashes they have
        fields += links
    canonical = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _translations_json(doc: DocumentIn) -> dict[str, dict[str, str]]:
    return {language: t.model_dump() for language, t in sorted(doc.translations.items())}


@dataclass(frozen=True)
class Source:
    """Where an imported document came from (both None for documents saved through the API)."""

    path: str | None = None
    hash: str | None = None


def to_document(row: sqlite3.Row) -> Document:
    """Build the public model from a documents row."""
    return Document(
        id=row["id"],
        title=row["title"],
        layer=row["layer"],
        tags=json.loads(row["tags"]),
        triggers=json.loads(row["triggers"]),
        summary=row["summary"],
        body=row["body"],
        related=json.loads(row["related"]),
        aliases=json.loads(row["aliases"]),
        translations=json.loads(row["translations"]),
        source_path=row["source_path"],
        content_hash=row["content_hash"],
        tokens=row["tokens"],
        revision=row["revision"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        deleted=row["deleted_at"] is not None,
    )


def to_summary(row: sqlite3.Row) -> DocumentSummary:
    """Build a listing entry from a documents row (body not needed)."""
    return DocumentSummary(
        id=row["id"],
        title=row["title"],
        layer=row["layer"],
        tags=json.loads(row["tags"]),
        summary=row["summary"],
        tokens=row["tokens"],
        revision=row["revision"],
        updated_at=row["updated_at"],
    )


async def fetch_row(conn: aiosqlite.Connection, doc_id: str) -> sqlite3.Row | None:
    """The documents row for `doc_id`, live or soft-deleted."""
    async with conn.execute(f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE id = ?", (doc_id,)) as cursor:
        row: sqlite3.Row | None = await cursor.fetchone()
        return row


async def import_rows(conn: aiosqlite.Connection, ids: list[str]) -> dict[str, sqlite3.Row]:
    """By id, the documents an import must reconcile with: every imported one, and any holding one of `ids`. Only
    the bookkeeping columns (replace and soft_delete need no more): at 100k documents the bodies are 450 MB."""
    async with conn.execute(
        "SELECT key, id, source_path, source_hash, revision, change, deleted_at FROM documents "
        "WHERE source_path IS NOT NULL OR id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids),),
    ) as cursor:
        return {row["id"]: row for row in await cursor.fetchall()}


async def fetch_by_alias(conn: aiosqlite.Connection, alias: str) -> sqlite3.Row | None:
    """The live document that absorbed the document once called `alias`, if any."""
    async with conn.execute(
        f"SELECT {DOCUMENT_COLUMNS} FROM documents WHERE key = (SELECT doc_key FROM aliases WHERE alias = ?) "
        "AND deleted_at IS NULL",
        (alias,),
    ) as cursor:
        row: sqlite3.Row | None = await cursor.fetchone()
        return row


def _fields(doc: DocumentIn) -> dict[str, Any]:
    titles = [t.title for t in doc.translations.values() if t.title]
    summaries = [t.summary for t in doc.translations.values() if t.summary]
    return {
        "title": doc.title,
        "layer": doc.layer,
        "tags": json.dumps(doc.tags, ensure_ascii=False),
        "triggers": json.dumps(doc.triggers, ensure_ascii=False),
        "summary": doc.summary,
        "body": doc.body,
        "related": json.dumps(doc.related, ensure_ascii=False),
        "aliases": json.dumps(doc.aliases, ensure_ascii=False),
        "translations": json.dumps(_translations_json(doc), ensure_ascii=False),
        "headings": "\n".join(heading_texts(doc.body)),
        "cjk": cjk_index_text(doc.title, *titles, " ".join(doc.triggers), doc.summary, *summaries, doc.body),
        "alt_titles": "\n".join(titles),
        "alt_summaries": "\n".join(summaries),
        "content_hash": content_hash(doc),
        "tokens": estimate_tokens(doc.body),
    }


async def _set_aliases(conn: aiosqlite.Connection, rows: list[tuple[int, list[str]]]) -> None:
    """Point each document's aliases at it. An alias another document claimed first stays with that one."""
    await conn.executemany("DELETE FROM aliases WHERE doc_key = ?", [(key,) for key, _ in rows])
    await conn.executemany(
        "INSERT OR IGNORE INTO aliases (alias, doc_key) VALUES (?, ?)",
        [(alias, key) for key, aliases in rows for alias in aliases],
    )


def _section_rows(doc_key: int, body: str) -> list[tuple[int, int, str, int, int, int]]:
    return [
        (doc_key, number, part.heading, part.start, part.end - part.start, estimate_tokens(body[part.start : part.end]))
        for number, part in enumerate(sections(body))
    ]


async def _insert_sections(conn: aiosqlite.Connection, doc_key: int, body: str) -> None:
    await conn.executemany(SECTION_INSERT, _section_rows(doc_key, body))


async def _drop_sections(conn: aiosqlite.Connection, doc_key: int) -> None:
    await conn.execute("DELETE FROM sections WHERE doc_key = ?", (doc_key,))


async def _archive(conn: aiosqlite.Connection, row: sqlite3.Row) -> None:
    await conn.execute(
        f"INSERT INTO revisions (doc_key, revision, change, {CONTENT_COLUMNS}, source_path, content_hash, tokens, "
        "created_at, deleted) "
        f"SELECT key, revision, change, {CONTENT_COLUMNS}, source_path, content_hash, tokens, updated_at, "
        "deleted_at IS NOT NULL FROM documents WHERE key = ?",
        (row["key"],),
    )


async def insert(conn: aiosqlite.Connection, doc: DocumentIn, source: Source) -> None:
    """Create a document at revision 1."""
    await insert_many(conn, [(doc, source)])


async def insert_many(conn: aiosqlite.Connection, items: list[tuple[DocumentIn, Source]]) -> None:
    """Create many documents at revision 1 in three statements (an import's new files arrive this way: one
    round trip to the database thread per document would cost more than indexing them)."""
    if not items:
        return
    now = now_iso()
    rows = [
        {**_fields(doc), "id": doc.id, "source_path": source.path, "source_hash": source.hash, "now": now}
        for doc, source in items
    ]
    await conn.executemany(DOCUMENT_INSERT, rows)
    ids = json.dumps([doc.id for doc, _ in items])
    async with conn.execute("SELECT id, key FROM documents WHERE id IN (SELECT value FROM json_each(?))", (ids,)) as c:
        keys: dict[str, int] = {row[0]: row[1] for row in await c.fetchall()}
    await conn.executemany(SECTION_INSERT, [row for doc, _ in items for row in _section_rows(keys[doc.id], doc.body)])
    await _set_aliases(conn, [(keys[doc.id], doc.aliases) for doc, _ in items if doc.aliases])


async def replace(
    conn: aiosqlite.Connection, row: sqlite3.Row, doc: DocumentIn, source: Source, change: Change
) -> None:
    """Store `doc` as the next revision of `row` (live afterwards), archiving the current one."""
    await _archive(conn, row)
    if row["deleted_at"] is None:
        await _drop_sections(conn, row["key"])
    values = _fields(doc)
    await conn.execute(
        "UPDATE documents SET title = :title, layer = :layer, tags = :tags, triggers = :triggers, summary = :summary, "
        "body = :body, related = :related, aliases = :aliases, translations = :translations, headings = :headings, "
        "cjk = :cjk, alt_titles = :alt_titles, alt_summaries = :alt_summaries, source_path = :source_path, "
        "source_hash = :source_hash, content_hash = :content_hash, tokens = :tokens, revision = revision + 1, "
        "change = :change, updated_at = :now, deleted_at = NULL WHERE key = :key",
        {
            **values,
            "source_path": source.path,
            "source_hash": source.hash,
            "change": change,
            "now": now_iso(),
            "key": row["key"],
        },
    )
    await _insert_sections(conn, row["key"], doc.body)
    await _set_aliases(conn, [(row["key"], doc.aliases)])


async def soft_delete(conn: aiosqlite.Connection, row: sqlite3.Row, change: Change) -> None:
    """Mark a live document deleted as a new revision; its text stays recoverable."""
    await _archive(conn, row)
    await _drop_sections(conn, row["key"])
    now = now_iso()
    await conn.execute(
        "UPDATE documents SET revision = revision + 1, change = ?, updated_at = ?, deleted_at = ? WHERE key = ?",
        (change, now, now, row["key"]),
    )


async def purge(conn: aiosqlite.Connection, row: sqlite3.Row) -> None:
    """Remove a soft-deleted document and all its revisions for good."""
    await conn.execute("DELETE FROM documents WHERE key = ?", (row["key"],))


async def revisions(conn: aiosqlite.Connection, row: sqlite3.Row) -> list[Revision]:
    """Every revision of the document in `row`, newest first."""
    current = Revision(
        id=row["id"],
        revision=row["revision"],
        change=row["change"],
        title=row["title"],
        layer=row["layer"],
        content_hash=row["content_hash"],
        tokens=row["tokens"],
        source_path=row["source_path"],
        created_at=row["updated_at"],
    )
    async with conn.execute(
        "SELECT revision, change, title, layer, content_hash, tokens, source_path, created_at FROM revisions "
        "WHERE doc_key = ? ORDER BY revision DESC",
        (row["key"],),
    ) as cursor:
        older = [
            Revision(
                id=row["id"],
                revision=r["revision"],
                change=r["change"],
                title=r["title"],
                layer=r["layer"],
                content_hash=r["content_hash"],
                tokens=r["tokens"],
                source_path=r["source_path"],
                created_at=r["created_at"],
            )
            for r in await cursor.fetchall()
        ]
    return [current, *older]


async def revision_content(conn: aiosqlite.Connection, row: sqlite3.Row, revision: int) -> DocumentIn | None:
    """The content of one revision of `row`'s document, or None if there is no such revision."""
    if revision == row["revision"]:
        source: sqlite3.Row | None = row
    else:
        async with conn.execute(
            f"SELECT {CONTENT_COLUMNS} FROM revisions WHERE doc_key = ? AND revision = ?", (row["key"], revision)
        ) as cursor:
            source = await cursor.fetchone()
    if source is None:
        return None
    return to_content(row["id"], source)


def to_content(doc_id: str, row: sqlite3.Row) -> DocumentIn:
    """The content of a documents or revisions row (both have the CONTENT_COLUMNS) as a document to store."""
    return DocumentIn(
        id=doc_id,
        title=row["title"],
        layer=row["layer"],
        body=row["body"],
        tags=json.loads(row["tags"]),
        triggers=json.loads(row["triggers"]),
        summary=row["summary"],
        related=json.loads(row["related"]),
        aliases=json.loads(row["aliases"]),
        translations=json.loads(row["translations"]),
    )


async def bump_generation(conn: aiosqlite.Connection, changed: Sequence[str] | None = None) -> int:
    """Advance the generation number that cache keys carry, and record which documents (by id) the write changed
    in the change log; every write transaction calls it once, last. `None` records that anything may have changed.
    """
    async with conn.execute(
        "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation' RETURNING value"
    ) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    generation = int(row[0])
    await _record_changes(conn, generation, changed)
    return generation


# The change log (table `changes`): which documents each generation changed. It keeps the newest CHANGE_RETENTION
# generations, enough for an instance that polls every second to catch up after a burst of writes; one that falls
# further behind treats everything as changed. A write naming more than CHANGE_IDS ids is logged as one '*' row, so
# an import of thousands of files costs one row. Old rows are dropped every PRUNE_EVERY generations (one statement
# less on most writes), so the log holds at most (CHANGE_RETENTION + PRUNE_EVERY) * 2 * CHANGE_IDS rows.
CHANGE_RETENTION = 1000
CHANGE_IDS = 100
PRUNE_EVERY = 50
EVERYTHING = "*"  # not a valid id (ids start with a letter, digit or '_')

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


async def _record_changes(conn: aiosqlite.Connection, generation: int, changed: Sequence[str] | None) -> None:
    if changed is None or len(changed) > CHANGE_IDS:
        await conn.execute(
            "INSERT INTO changes (generation, doc_id, layer, listed) VALUES (?, ?, NULL, 1)", (generation, EVERYTHING)
        )
    elif changed:
        await conn.execute(_RECORD_CHANGES, {"generation": generation, "ids": json.dumps(list(changed))})
    if generation % PRUNE_EVERY == 0:
        await conn.execute("DELETE FROM changes WHERE generation <= ?", (generation - CHANGE_RETENTION,))


@dataclass(frozen=True)
class ChangeLog:
    """What the change log says happened after a generation: its rows (generation, doc_id, layer, listed), oldest
    first, and the newest generation at the time of reading. `complete` is False when rows the reader needed were
    already dropped or there were more than it asked for."""

    newest: int
    rows: list[tuple[int, str, str | None, bool]]
    complete: bool


async def changes_after(conn: aiosqlite.Connection, generation: int, limit: int) -> ChangeLog:
    """The change log after `generation`, at most `limit` rows, read in one statement (so one snapshot: the newest
    generation and the rows agree)."""
    async with conn.execute(
        "SELECT CAST(value AS INTEGER), NULL, NULL, NULL FROM meta WHERE key = 'generation' "
        "UNION ALL SELECT * FROM (SELECT generation, doc_id, layer, listed FROM changes WHERE generation > ? "
        "ORDER BY generation LIMIT ?)",
        (generation, limit + 1),
    ) as cursor:
        found = list(await cursor.fetchall())
    newest = next((int(r[0]) for r in found if r[1] is None), 0)
    rows = [(int(r[0]), str(r[1]), r[2], bool(r[3])) for r in found if r[1] is not None]
    complete = len(rows) <= limit and generation >= newest - CHANGE_RETENTION
    return ChangeLog(newest=newest, rows=rows[:limit], complete=complete)


async def generation(conn: aiosqlite.Connection) -> int:
    """The current generation number."""
    async with conn.execute("SELECT value FROM meta WHERE key = 'generation'") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def identity(conn: aiosqlite.Connection) -> tuple[str, datetime]:
    """The random identity this database was given when it was created (a restore gives it a new one), and when
    it was created."""
    async with conn.execute("SELECT key, value FROM meta WHERE key IN ('database_id', 'created_at')") as cursor:
        meta = {row[0]: row[1] for row in await cursor.fetchall()}
    try:
        created = datetime.fromisoformat(meta["created_at"])
    except ValueError:  # only ever read for the age of the newest backup: a bad value must not stop the server
        created = datetime.now(UTC)
    return meta["database_id"], created


# -- keys and the audit trail --------------------------------------------------------------------------------------

KEY_COLUMNS = "name, digest, scope, created_at, expires_at, revoked_at"


async def insert_key(conn: aiosqlite.Connection, name: str, digest: str, scope: str, expires_at: str | None) -> None:
    """Store a new key (its digest, never its secret)."""
    await conn.execute(
        f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL)",
        (name, digest, scope, now_iso(), expires_at),
    )


async def keys(conn: aiosqlite.Connection) -> list[sqlite3.Row]:
    """Every key ever made, revoked ones included, oldest first."""
    async with conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, name") as cursor:
        return list(await cursor.fetchall())


async def revoke_key(conn: aiosqlite.Connection, name: str) -> bool:
    """Revoke the key `name`; False when there is no such key that is not revoked already."""
    async with conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL RETURNING name", (now_iso(), name)
    ) as cursor:
        return await cursor.fetchone() is not None


AUDIT_COLUMNS = "at, key_name, client, operation, target, revision, outcome, count, detail"


async def insert_audit(conn: aiosqlite.Connection, rows: list[tuple[object, ...]]) -> None:
    """Append audit entries: tuples in AUDIT_COLUMNS order."""
    await conn.executemany(f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


async def add_auth_failures(conn: aiosqlite.Connection, rows: list[tuple[str, str, str, int]]) -> None:
    """Count authentication failures into one entry per (minute, client, reason): (minute, client, reason, count)."""
    for minute, client, reason, count in rows:
        async with conn.execute(
            "UPDATE audit SET count = count + ? WHERE operation = 'authenticate' AND at = ? AND client = ? "
            "AND outcome = ? RETURNING seq",
            (count, minute, client, reason),
        ) as cursor:
            updated = await cursor.fetchone() is not None
        if not updated:
            await insert_audit(conn, [(minute, "anonymous", client, "authenticate", None, None, reason, count, "{}")])


async def audit_entries(conn: aiosqlite.Connection, since: str, after: int, limit: int) -> list[sqlite3.Row]:
    """Audit entries at or after `since` (ISO time) and after entry `after`, in the order written, at most `limit`."""
    async with conn.execute(
        f"SELECT seq, {AUDIT_COLUMNS} FROM audit WHERE at >= ? AND seq > ? ORDER BY seq LIMIT ?", (since, after, limit)
    ) as cursor:
        return list(await cursor.fetchall())


async def audit_after(conn: aiosqlite.Connection, at: str) -> list[sqlite3.Row]:
    """Every audit entry written after `at` (ISO time), in order: what a restore carries forward."""
    async with conn.execute(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE at > ? ORDER BY seq", (at,)) as cursor:
        return list(await cursor.fetchall())


async def prune_audit(conn: aiosqlite.Connection, before: str) -> int:
    """Delete audit entries older than `before` (ISO time); how many went."""
    async with conn.execute("DELETE FROM audit WHERE at < ? RETURNING seq", (before,)) as cursor:
        return len(list(await cursor.fetchall()))
