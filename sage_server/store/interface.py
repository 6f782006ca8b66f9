"""The store boundary: everything SAGE asks of its database, as typed methods. Only sage_server.store speaks SQL;
the service, context packing, search ranking, backup, keys and the audit trail use these protocols.

A `Store` hands out sessions: `read()` a `Reader` (a consistent snapshot, never blocking writers), `transaction()` a
`Writer` (one write transaction, committed when the block ends, rolled back when it raises). Database failures
surface as `Unavailable`, never as a driver's exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from sage_server.models import AuditEntry, Change, DocumentIn, Revision
from sage_server.store.export_records import ExportRecord, Kind
from sage_server.store.records import (
    ChangeLog,
    DocumentPage,
    DocumentRef,
    ImportCandidate,
    LayerTotal,
    Source,
    StoredDocument,
    StoredKey,
)
from sage_server.store.search_index import SearchIndex

Backend = Literal["sqlite", "postgresql"]
# An audit entry to write: (at, key_name, client, operation, target, revision, outcome, count, detail as JSON).
AuditRow = tuple[object, ...]


class Reader(SearchIndex, Protocol):
    """Reads, all from one snapshot of the database."""

    async def document(self, doc_id: str) -> StoredDocument | None:
        """The document with `doc_id`, live or soft-deleted."""

    async def document_by_alias(self, alias: str) -> StoredDocument | None:
        """The live document that absorbed the document once called `alias`, if any."""

    async def revisions(self, doc: StoredDocument) -> list[Revision]:
        """Every revision of `doc`, newest (the current one) first."""

    async def revision_content(self, doc: StoredDocument, revision: int) -> DocumentIn | None:
        """The content of one revision of `doc`, or None when it has no such revision."""

    async def list_documents(
        self, layers: list[str] | None, tags: list[str] | None, limit: int, offset: int
    ) -> DocumentPage:
        """Live documents in (layer, id) order, filtered by layers and (all of) tags; `limit` + 1 items at most
        (one more than a page, so the caller knows whether another page follows)."""

    async def ids_from(self, prefix: str, limit: int) -> list[str]:
        """Ids of live documents starting with `prefix` (close-id suggestions)."""

    async def layer_totals(self) -> list[LayerTotal]:
        """Live documents and tokens per layer (layers without any left out)."""

    async def has_live_documents(self) -> bool:
        """Whether any document is live."""

    async def import_candidates(self, ids: list[str]) -> dict[str, ImportCandidate]:
        """By id, the documents an import must reconcile with: every imported one, and any holding one of `ids`."""

    async def taken_ids(self, ids: list[str]) -> set[str]:
        """Which of `ids` a stored document has (live or soft-deleted)."""

    async def generation(self) -> int:
        """The current generation number (every committed write advances it)."""

    async def identity(self) -> tuple[str, datetime]:
        """The database's random identity (a restore gives it a new one), and when it was created."""

    async def changes_after(self, generation: int, limit: int) -> ChangeLog:
        """The change log after `generation`, at most `limit` rows, from one snapshot."""

    async def keys(self) -> list[StoredKey]:
        """Every key ever made, revoked ones included, oldest first."""

    async def audit_entries(self, since: str, after: int, limit: int) -> list[AuditEntry]:
        """Audit entries at or after `since` (ISO time) and after entry `after`, in the order written."""

    async def counts(self) -> dict[Kind, int]:
        """How many rows of each exported kind there are (documents live and deleted, revisions, aliases, keys,
        audit entries)."""

    def dump(self, kind: Kind) -> AsyncIterator[ExportRecord]:
        """Every row of one kind as export records, in a backend-independent order, streamed (bounded memory)."""


class Writer(Reader, Protocol):
    """One write transaction; it reads its own writes."""

    async def insert_many(self, items: list[tuple[DocumentIn, Source]]) -> None:
        """Create documents at revision 1."""

    async def set_source_stats(self, stats: list[tuple[DocumentRef, str | None]]) -> None:
        """Record what an import saw of unchanged source files (Source.stat), without a new revision."""

    async def replace(self, ref: DocumentRef, doc: DocumentIn, source: Source, change: Change) -> None:
        """Store `doc` as the next revision of `ref` (live afterwards), archiving the current one."""

    async def soft_delete(self, ref: DocumentRef, change: Change) -> None:
        """Mark a live document deleted as a new revision; its text stays recoverable."""

    async def purge(self, ref: DocumentRef) -> None:
        """Remove a soft-deleted document and all its revisions for good."""

    async def bump_generation(self, changed: list[str] | None = None) -> int:
        """Advance the generation and log which documents (by id) the write changed (None: anything may have).
        Every write transaction that changes documents calls it once, last."""

    async def insert_key(self, name: str, digest: str, scope: str, expires_at: str | None) -> bool:
        """Store a new key (its digest, never its secret); False when the name is taken (names are never reused)."""

    async def revoke_key(self, name: str) -> bool:
        """Revoke the key `name`; False when there is no such key that is not revoked already."""

    async def insert_audit(self, rows: list[AuditRow]) -> None:
        """Append audit entries."""

    async def add_auth_failures(self, rows: list[tuple[str, str, str, int]]) -> None:
        """Count authentication failures into one entry per (minute, client, reason): (minute, client, reason, n)."""

    async def prune_audit(self, before: str) -> int:
        """Delete audit entries older than `before` (ISO time); how many went."""

    async def clear(self) -> None:
        """Remove every document, revision, alias, key, audit entry and change-log row (an import replacing all)."""

    async def load(self, records: Sequence[ExportRecord]) -> None:
        """Store exported records as they were (documents before the revisions and aliases naming them); the search
        index and sections follow the loaded documents."""

    async def finish_load(self, database_id: str, created_at: str, generation: int) -> None:
        """Set the loaded knowledge base's identity, creation time and generation (bump_generation comes after)."""


class Store(Protocol):
    """One database holding a knowledge base."""

    @property
    def backend(self) -> Backend:
        """Which kind of database it is."""

    @property
    def searchable(self) -> bool:
        """Whether the full-text index (the SearchIndex reads) is there; without it search and context refuse."""

    @property
    def path(self) -> Path | None:
        """The database file, for a store that is one (backups copy it); None for a database server."""

    @property
    def location(self) -> str:
        """Where the data is, for people (a file path, or a URL without its password)."""

    async def watch(self, seen: Callable[[int], None]) -> None:
        """Until cancelled, call `seen(generation)` whenever any instance commits a write, where the database can
        push it (PostgreSQL's LISTEN/NOTIFY); return at once where it cannot (SQLite: the service's poll tells)."""

    async def open(self) -> list[str]:
        """Connect and migrate to the newest schema; the migrations applied now."""

    def read(self) -> AbstractAsyncContextManager[Reader]:
        """A read session."""

    def transaction(self) -> AbstractAsyncContextManager[Writer]:
        """A write transaction."""

    def snapshot(self) -> AbstractAsyncContextManager[Reader]:
        """A read session in one transaction however long it takes, with no deadline (exports read through it)."""

    def job_lock(self, folder: Path) -> AbstractAsyncContextManager[bool]:
        """Try to take the backup job's lock, without waiting: True while held. On SQLite a lock file in the backup
        `folder`; on PostgreSQL an advisory lock of the database (one holder among every instance using it)."""

    async def other_sessions(self) -> list[str]:
        """The other clients connected to the database, described for people (PostgreSQL: any SAGE instance shows
        as `sage:<tag>`); always empty for SQLite, whose file lock refuses a restore while the file is served."""

    async def analyze(self) -> None:
        """Refresh the query planner's statistics after a bulk write (an import of many documents), so the next
        searches are planned for the data as it is now rather than as it was."""

    async def close(self) -> None:
        """Close every connection; safe to call twice."""
