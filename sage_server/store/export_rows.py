"""Export records to and from database rows, for both stores: the statements are the same in SQLite and PostgreSQL
(written with %(name)s placeholders; SQLite's module turns them into :name), and so are the conversions.

Rows are dumped in an order that does not depend on the backend or on internal keys (documents by id, revisions by
id and number, aliases by alias, keys by name, audit entries by sequence), so exports of the same knowledge base
from either store list the same records in the same order."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sage_server.models import DocumentIn
from sage_server.store.export_records import (
    KINDS,
    AliasRecord,
    AuditRecord,
    DocumentRecord,
    ExportRecord,
    KeyRecord,
    Kind,
    RevisionRecord,
)
from sage_server.store.rows import Row, document_fields

_CONTENT = "title, layer, tags, triggers, summary, body, related, aliases, translations"
_DOCUMENT = (
    f"id, {_CONTENT}, source_path, source_hash, content_hash, tokens, revision, change, created_at, updated_at, "
    "deleted_at"
)
_JSON_FIELDS = ("tags", "triggers", "related", "aliases", "translations")
_KEY = "name, digest, scope, created_at, expires_at, revoked_at"
_AUDIT = "seq, at, key_name, client, operation, target, revision, outcome, count, detail"

DUMP: dict[Kind, str] = {
    "document": f"SELECT {_DOCUMENT} FROM documents ORDER BY id",
    "revision": (
        "SELECT d.id AS doc_id, r.revision, r.change, r.title, r.layer, r.tags, r.triggers, r.summary, r.body, "
        "r.related, r.aliases, r.translations, r.source_path, r.content_hash, r.tokens, r.created_at, r.deleted "
        "FROM revisions AS r JOIN documents AS d ON d.key = r.doc_key ORDER BY d.id, r.revision"
    ),
    "alias": (
        "SELECT a.alias, d.id AS doc_id FROM aliases AS a JOIN documents AS d ON d.key = a.doc_key ORDER BY a.alias"
    ),
    "key": f"SELECT {_KEY} FROM api_keys ORDER BY name",
    "audit": f"SELECT {_AUDIT} FROM audit ORDER BY seq",
}

COUNTS = (
    "SELECT (SELECT count(*) FROM documents) AS document, (SELECT count(*) FROM revisions) AS revision, "
    '(SELECT count(*) FROM aliases) AS alias, (SELECT count(*) FROM api_keys) AS "key", '
    "(SELECT count(*) FROM audit) AS audit"
)

# What replacing a knowledge base removes: everything but the schema and meta (whose values the load then sets).
CLEAR = (
    "DELETE FROM sections",
    "DELETE FROM aliases",
    "DELETE FROM revisions",
    "DELETE FROM documents",
    "DELETE FROM api_keys",
    "DELETE FROM audit",
    "DELETE FROM changes",
)

LOAD: dict[Kind, str] = {
    "document": (
        "INSERT INTO documents (id, title, layer, tags, triggers, summary, body, related, aliases, translations, "
        "headings, cjk, alt_titles, alt_summaries, source_path, source_hash, content_hash, tokens, revision, change, "
        "created_at, updated_at, deleted_at) VALUES (%(id)s, %(title)s, %(layer)s, %(tags)s, %(triggers)s, "
        "%(summary)s, %(body)s, %(related)s, %(aliases)s, %(translations)s, %(headings)s, %(cjk)s, %(alt_titles)s, "
        "%(alt_summaries)s, %(source_path)s, %(source_hash)s, %(content_hash)s, %(tokens)s, %(revision)s, "
        "%(change)s, %(created_at)s, %(updated_at)s, %(deleted_at)s)"
    ),
    "revision": (
        "INSERT INTO revisions (doc_key, revision, change, title, layer, tags, triggers, summary, body, related, "
        "aliases, translations, source_path, content_hash, tokens, created_at, deleted) "
        "SELECT key, %(revision)s, %(change)s, %(title)s, %(layer)s, %(tags)s, %(triggers)s, %(summary)s, %(body)s, "
        "%(related)s, %(aliases)s, %(translations)s, %(source_path)s, %(content_hash)s, %(tokens)s, %(created_at)s, "
        "%(deleted)s FROM documents WHERE id = %(doc_id)s"
    ),
    "alias": "INSERT INTO aliases (alias, doc_key) SELECT %(alias)s, key FROM documents WHERE id = %(doc_id)s",
    "key": (
        f"INSERT INTO api_keys ({_KEY}) "
        "VALUES (%(name)s, %(digest)s, %(scope)s, %(created_at)s, %(expires_at)s, %(revoked_at)s)"
    ),
    "audit": (
        f"INSERT INTO audit ({_AUDIT}) VALUES (%(seq)s, %(at)s, %(key_name)s, %(client)s, %(operation)s, "
        "%(target)s, %(revision)s, %(outcome)s, %(count)s, %(detail)s)"
    ),
}

SET_META = "UPDATE meta SET value = %(value)s WHERE key = %(key)s"


def to_record(kind: Kind, row: Row) -> ExportRecord:
    """The export record of a row that DUMP[kind] read."""
    if kind == "document":
        return DocumentRecord.model_validate(_decoded(row, DocumentRecord.model_fields))
    if kind == "revision":
        fields = _decoded(row, RevisionRecord.model_fields)
        return RevisionRecord.model_validate({**fields, "deleted": bool(fields["deleted"])})
    if kind == "alias":
        return AliasRecord(alias=row["alias"], doc_id=row["doc_id"])
    if kind == "key":
        return KeyRecord.model_validate({name: row[name] for name in KeyRecord.model_fields if name != "type"})
    fields = {name: row[name] for name in AuditRecord.model_fields if name != "type"}
    return AuditRecord.model_validate({**fields, "detail": json.loads(fields["detail"])})


def _decoded(row: Row, names: Any) -> dict[str, Any]:
    fields = {name: row[name] for name in names if name != "type"}
    for name in _JSON_FIELDS:
        fields[name] = json.loads(fields[name])
    return fields


def _json(value: object) -> str:
    # As the stores write them (rows.document_fields), so a loaded row is the row that was exported.
    return json.dumps(value, ensure_ascii=False)


def load_params(records: Sequence[ExportRecord]) -> dict[Kind, list[dict[str, Any]]]:
    """The LOAD parameters of `records`, by kind, in their order. A document's derived columns (index text) are
    computed as a save computes them; its hash, tokens and bookkeeping are loaded as exported."""
    params: dict[Kind, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for record in records:
        fields = record.model_dump(exclude={"type"})
        if isinstance(record, DocumentRecord | RevisionRecord):
            fields.update({name: _json(fields[name]) for name in _JSON_FIELDS})
        if isinstance(record, DocumentRecord):
            derived = document_fields(
                DocumentIn.model_validate(record.model_dump(include=set(DocumentIn.model_fields)))
            )
            fields.update({name: derived[name] for name in ("headings", "cjk", "alt_titles", "alt_summaries")})
        if isinstance(record, AuditRecord):
            fields["detail"] = _json(fields["detail"])
        params[record.type].append(fields)
    return params


def meta_params(database_id: str, created_at: str, generation: int) -> list[dict[str, str]]:
    """SET_META parameters for a loaded knowledge base's identity and generation."""
    values = {"database_id": database_id, "created_at": created_at, "generation": str(generation)}
    return [{"key": key, "value": value} for key, value in values.items()]
