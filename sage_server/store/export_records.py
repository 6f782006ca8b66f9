"""The records of a portable export (`sage export`): every stored row a knowledge base cannot rebuild, one typed record
per row, the same from SQLite and PostgreSQL. Derived columns (index text, sections) are not exported: the target
store computes them again when it loads the documents."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Kind = Literal["document", "revision", "alias", "key", "audit"]
# The order records are written and loaded in: a revision or alias names a document loaded before it.
KINDS: tuple[Kind, ...] = ("document", "revision", "alias", "key", "audit")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DocumentRecord(_Record):
    """A document's current revision, live or soft-deleted (`deleted_at`), with its bookkeeping as stored."""

    type: Literal["document"] = "document"
    id: str
    title: str
    layer: str
    tags: list[str]
    triggers: list[str]
    summary: str
    body: str
    related: list[str]
    aliases: list[str]
    translations: dict[str, dict[str, str]]
    source_path: str | None
    source_hash: str | None
    content_hash: str
    tokens: int
    revision: int
    change: str
    created_at: str
    updated_at: str
    deleted_at: str | None


class RevisionRecord(_Record):
    """A superseded revision of the document `doc_id` (the current one is its DocumentRecord)."""

    type: Literal["revision"] = "revision"
    doc_id: str
    revision: int
    change: str
    title: str
    layer: str
    tags: list[str]
    triggers: list[str]
    summary: str
    body: str
    related: list[str]
    aliases: list[str]
    translations: dict[str, dict[str, str]]
    source_path: str | None
    content_hash: str
    tokens: int
    created_at: str
    deleted: bool


class AliasRecord(_Record):
    """An id that now reads the document `doc_id` (kept as stored: when two documents claim one alias, the first)."""

    type: Literal["alias"] = "alias"
    alias: str
    doc_id: str


class KeyRecord(_Record):
    """An API key: the digest of its secret (never the secret), scope and state."""

    type: Literal["key"] = "key"
    name: str
    digest: str
    scope: Literal["read", "write", "admin"]
    created_at: str
    expires_at: str | None
    revoked_at: str | None


class AuditRecord(_Record):
    """An audit entry, with its sequence number."""

    type: Literal["audit"] = "audit"
    seq: int
    at: str
    key_name: str
    client: str
    operation: str
    target: str | None
    revision: int | None
    outcome: str
    count: int
    detail: dict[str, object]


ExportRecord = Annotated[
    DocumentRecord | RevisionRecord | AliasRecord | KeyRecord | AuditRecord, Field(discriminator="type")
]
