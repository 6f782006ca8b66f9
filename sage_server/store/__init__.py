"""The store: the one package that speaks SQL. Everything else uses the `Store` protocol (store/interface.py) and
the records it returns; tests/test_architecture.py keeps it that way."""

from __future__ import annotations

from pathlib import Path

from sage_server.config import Settings
from sage_server.store.interface import AuditRow, Backend, Reader, Store, Writer
from sage_server.store.records import (
    CHANGE_IDS,
    CHANGE_RETENTION,
    EVERYTHING,
    PRUNE_EVERY,
    ChangeLog,
    Check,
    DocumentPage,
    DocumentRef,
    ImportCandidate,
    LayerTotal,
    Source,
    StoredDocument,
    StoredKey,
    VerifyReport,
    content_hash,
    now_iso,
)

__all__ = [
    "CHANGE_IDS",
    "CHANGE_RETENTION",
    "EVERYTHING",
    "PRUNE_EVERY",
    "AuditRow",
    "Backend",
    "ChangeLog",
    "Check",
    "DocumentPage",
    "DocumentRef",
    "ImportCandidate",
    "LayerTotal",
    "Reader",
    "Source",
    "Store",
    "StoredDocument",
    "StoredKey",
    "VerifyReport",
    "Writer",
    "content_hash",
    "now_iso",
    "open_store",
    "reader_count",
    "sqlite_store",
]


def sqlite_store(path: Path, readers: int = 0, cache_mb: int = 64) -> Store:
    """A store in the SQLite file at `path`, with `readers` reader connections (0: sized from the cores) sharing
    `cache_mb` of page cache with the writer."""
    from sage_server.store.sqlite import SqliteStore  # noqa: PLC0415 - it imports search.py, which imports records

    return SqliteStore(path, readers, cache_mb * 2**20)


def open_store(settings: Settings) -> Store:
    """The store the settings choose (not yet connected: call `open()`): PostgreSQL when database_url is set,
    else the SQLite file at db_path."""
    if settings.database_url is not None:
        from sage_server.store.postgres import PostgresStore  # noqa: PLC0415 - psycopg is loaded only when chosen

        return PostgresStore(settings.database_url.get_secret_value(), settings.database_pool_size)
    return sqlite_store(settings.db_path, settings.sqlite_readers, settings.sqlite_cache_mb)


def reader_count(settings: Settings) -> int:
    """How many reads the chosen store serves at once: its SQLite readers, or its PostgreSQL pool."""
    if settings.database_url is not None:
        return settings.database_pool_size
    from sage_server.store.sqlite import default_readers  # noqa: PLC0415 - as in sqlite_store

    return settings.sqlite_readers or default_readers()
