"""The small typed records the store hands out besides the public models: what callers need of a stored row, by
attribute, so no caller reads a database row by column name."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from sage_server.models import ApiKey, Change, Document, DocumentIn, DocumentSummary


def now_iso() -> str:
    """The current UTC time as ISO-8601 text, the form every timestamp is stored in."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def translations_json(doc: DocumentIn) -> dict[str, dict[str, str]]:
    """A document's translations as plain dicts in language order (how they are stored and hashed)."""
    return {language: t.model_dump() for language, t in sorted(doc.translations.items())}


def content_hash(doc: DocumentIn) -> str:
    """sha256 over a document's content fields, so an identical save is recognised and not stored twice."""
    fields: list[Any] = [doc.title, doc.layer, doc.tags, doc.triggers, doc.summary, doc.body]
    links = [doc.related, doc.aliases, translations_json(doc)]
    if any(links):  # only then: documents stored before these fields existed keep the hashes they have
        fields += links
    canonical = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Source:
    """Where an imported document came from (all None for documents saved through the API): the file, the sha256 of
    its bytes, and what the import saw of it (ingest.file_stat; None when unknown) to skip it unread next time."""

    path: str | None = None
    hash: str | None = None
    stat: str | None = None


@dataclass(frozen=True, slots=True)
class DocumentRef:
    """Which stored document a write targets: its internal key (never shown), its id, current revision, and
    whether it is soft-deleted."""

    key: int
    id: str
    revision: int
    deleted: bool


@dataclass(frozen=True)
class StoredDocument:
    """A document as stored: the public model, the reference writes take, and where it was imported from."""

    ref: DocumentRef
    document: Document
    source: Source
    change: Change


@dataclass(frozen=True, slots=True)
class ImportCandidate:
    """The bookkeeping an import reconciles with (no body: at 100k documents the bodies are 450 MB). Flat, one object
    per stored document rather than three: an import surveys every one of them, and each object costs time to build
    and for the garbage collector to go through. `ref` and `source` are built when asked for (by the few written)."""

    key: int
    id: str
    revision: int
    deleted: bool
    source_path: str | None
    source_hash: str | None
    source_stat: str | None
    change: Change

    @property
    def ref(self) -> DocumentRef:
        return DocumentRef(self.key, self.id, self.revision, self.deleted)

    @property
    def source(self) -> Source:
        return Source(self.source_path, self.source_hash, self.source_stat)


@dataclass(frozen=True)
class DocumentPage:
    """One page of live documents and how many match in all."""

    items: list[DocumentSummary]
    total: int


@dataclass(frozen=True)
class LayerTotal:
    """How many live documents a layer holds, and their tokens."""

    layer: str
    documents: int
    tokens: int


@dataclass(frozen=True)
class StoredKey:
    """A key as stored: its public description and the digest of its secret."""

    key: ApiKey
    digest: str


@dataclass(frozen=True)
class ChangeLog:
    """What the change log says happened after a generation: its rows (generation, doc_id, layer, listed), oldest
    first, and the newest generation at the time of reading. `complete` is False when rows the reader needed were
    already dropped or there were more than it asked for."""

    newest: int
    rows: list[tuple[int, str, str | None, bool]]
    complete: bool


# The change log (table `changes`): which documents each generation changed. It keeps the newest CHANGE_RETENTION
# generations, enough for an instance that polls every second to catch up after a burst of writes; one that falls
# further behind treats everything as changed. A write naming more than CHANGE_IDS ids is logged as one '*' row, so
# an import of thousands of files costs one row. Old rows are dropped every PRUNE_EVERY generations (one statement
# less on most writes), so the log holds at most (CHANGE_RETENTION + PRUNE_EVERY) * 2 * CHANGE_IDS rows.
CHANGE_RETENTION = 1000
CHANGE_IDS = 100
PRUNE_EVERY = 50
EVERYTHING = "*"  # not a valid id (ids start with a letter, digit or '_')


class Check(BaseModel):
    """One verification: its name, whether it passed, and what it found."""

    name: str
    ok: bool
    detail: str


class VerifyReport(BaseModel):
    """The outcome of `verify`: ok only when every check passed."""

    path: str
    ok: bool
    checks: list[Check]


@dataclass(frozen=True)
class SearchRow:
    """A document the full-text index matched, with its BM25 score (lower is better) and the columns ranking reads
    before the body."""

    key: int
    id: str
    title: str
    layer: str
    tags: list[str]
    triggers: list[str]
    summary: str
    score: float


@dataclass(frozen=True)
class Body:
    """The opening of a document's body, and the columns stored after it."""

    text: str
    tokens: int
    revision: int
    alternates: str = ""  # titles and summaries in other languages, newline-separated


@dataclass(frozen=True)
class Essential:
    """A live document of the core layer as context packing lists it."""

    id: str
    title: str
    summary: str


@dataclass(frozen=True)
class SectionText:
    """One section of a document (by its internal key): its place, heading and text."""

    doc_key: int
    ord: int
    heading: str
    text: str
