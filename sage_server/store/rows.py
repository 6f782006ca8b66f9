"""Database rows as the store's records and models, for every backend: the columns are the same in SQLite and
PostgreSQL (JSON lists as text, times as ISO-8601 text), so one conversion serves both."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from sage_server.markdown import heading_texts, sections
from sage_server.models import Document, DocumentIn, DocumentSummary
from sage_server.store.records import (
    DocumentRef,
    ImportCandidate,
    Source,
    StoredDocument,
    content_hash,
    translations_json,
)
from sage_server.text import cjk_index_text, estimate_tokens


class Row(Protocol):
    """A row read by column name (sqlite3.Row, or a dict from psycopg's dict_row)."""

    def __getitem__(self, key: str, /) -> Any: ...


def to_document(row: Row) -> Document:
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


def to_summary(row: Row) -> DocumentSummary:
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


def to_content(doc_id: str, row: Row) -> DocumentIn:
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


def ref(row: Row) -> DocumentRef:
    return DocumentRef(key=row["key"], id=row["id"], revision=row["revision"], deleted=row["deleted_at"] is not None)


def stored(row: Row | None) -> StoredDocument | None:
    if row is None:
        return None
    source = Source(row["source_path"], row["source_hash"])
    return StoredDocument(ref=ref(row), document=to_document(row), source=source, change=row["change"])


# The columns of an import's survey of the store, in the order import_candidate takes them.
IMPORT_COLUMNS = "key, id, source_path, source_hash, source_stat, revision, change, deleted_at"


def import_candidate(row: Sequence[Any]) -> ImportCandidate:
    """An import's bookkeeping from a plain tuple of the IMPORT_COLUMNS. A re-scan builds one per stored document
    (100k of them), so by position: unpacking a tuple costs a fraction of reading a sqlite3.Row or dict by name."""
    key, doc_id, path, source_hash, stat, revision, change, deleted_at = row
    return ImportCandidate(key, doc_id, revision, deleted_at is not None, path, source_hash, stat, change)


def source_fields(source: Source) -> dict[str, str | None]:
    """The documents columns a document's source fills (named parameters of both stores' writes)."""
    return {"source_path": source.path, "source_hash": source.hash, "source_stat": source.stat}


def document_fields(doc: DocumentIn) -> dict[str, Any]:
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
        "translations": json.dumps(translations_json(doc), ensure_ascii=False),
        "headings": "\n".join(heading_texts(doc.body)),
        "cjk": cjk_index_text(doc.title, *titles, " ".join(doc.triggers), doc.summary, *summaries, doc.body),
        "alt_titles": "\n".join(titles),
        "alt_summaries": "\n".join(summaries),
        "content_hash": content_hash(doc),
        "tokens": estimate_tokens(doc.body),
    }


def section_rows(doc_key: int, body: str) -> list[tuple[int, int, str, int, int, int]]:
    return [
        (doc_key, number, part.heading, part.start, part.end - part.start, estimate_tokens(body[part.start : part.end]))
        for number, part in enumerate(sections(body))
    ]
