"""The SQLite store's files: online copies, integrity verification, and replacing the database with a backup.
Retention, checksums, the schedule and the state of backups are backup.py's; this is what touches SQLite."""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from sage_server.errors import InvalidInput, Unavailable
from sage_server.resources import migrations_dir
from sage_server.store.interface import AuditRow
from sage_server.store.migrations import migration_files
from sage_server.store.records import Check, VerifyReport, content_hash
from sage_server.store.rows import to_content
from sage_server.store.sqlite_documents import AUDIT_COLUMNS


@dataclass(frozen=True)
class _Query:
    name: str
    sql: str
    expect_ok: str | None  # the single value a healthy database answers, or None for "no rows"


QUICK_CHECKS = (
    _Query("sqlite integrity", "PRAGMA integrity_check", "ok"),
    _Query("foreign keys", "PRAGMA foreign_key_check", None),
)


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if not path.is_file():
        raise InvalidInput(f"{path}: no such database file", path=str(path))
    try:
        target = f"{path.resolve().as_uri()}?mode=ro" if readonly else str(path)
        conn = sqlite3.connect(target, uri=readonly, timeout=10)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise Unavailable(f"{path}: cannot open as a SQLite database: {exc}", path=str(path)) from exc
    return conn


def verify(path: Path, thorough: bool = False) -> VerifyReport:
    """Check a SAGE database: SQLite's integrity, the full-text index against exactly the live documents, the
    migrations against the shipped files; with `thorough`, every document's content hash and revision chain too."""
    # Read-write only because FTS5's integrity check is an INSERT in form; everything runs in a transaction
    # that is rolled back, so verifying changes nothing.
    conn = _connect(path, readonly=False)
    conn.isolation_level = None
    conn.row_factory = sqlite3.Row
    conn.execute("BEGIN")
    checks: list[Check] = []
    try:
        for query in QUICK_CHECKS:
            rows = [tuple(row) for row in conn.execute(query.sql).fetchall()]
            ok = rows == [(query.expect_ok,)] if query.expect_ok else rows == []
            checks.append(Check(name=query.name, ok=ok, detail="ok" if ok else f"{len(rows)} problems: {rows[:3]}"))
        checks.append(_schema(conn))
        if checks[-1].ok:
            checks.append(_fts(conn, "docs_fts"))
            if thorough:
                checks += [_hashes(conn), _revisions(conn)]
    except sqlite3.Error as exc:
        checks.append(Check(name="readable", ok=False, detail=str(exc)))
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    return VerifyReport(path=str(path), ok=all(c.ok for c in checks), checks=checks)


def _schema(conn: sqlite3.Connection) -> Check:
    try:
        applied = dict(conn.execute("SELECT name, sha256 FROM schema_migrations").fetchall())
    except sqlite3.Error:
        return Check(name="migrations", ok=False, detail="no schema_migrations table: not a SAGE database")
    shipped = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in migration_files(migrations_dir())}
    changed = sorted(name for name in applied if name in shipped and applied[name] != shipped[name])
    unknown = sorted(set(applied) - set(shipped))
    if changed or unknown:
        return Check(name="migrations", ok=False, detail=f"changed: {changed}, unknown to this SAGE: {unknown}")
    return Check(name="migrations", ok=True, detail=f"{len(applied)} applied, {len(shipped) - len(applied)} pending")


def _fts(conn: sqlite3.Connection, table: str) -> Check:
    # FTS5's own check. Rank 1 makes it compare the index with its content, a view of exactly the live documents
    # (migration 0002), not only with itself: a missing, extra or stale entry fails, a soft-deleted one does not.
    # A database from before that migration indexed a table holding deleted rows too: only its structure is
    # checked (opening it with SAGE migrates it and rebuilds the index).
    live_view = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'indexed_documents'").fetchone() is not None
    try:
        conn.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('integrity-check', ?)", (1 if live_view else 0,))
        detail = "ok" if live_view else "structure ok (rebuilt against the live documents when SAGE opens it)"
        return Check(name=f"index {table}", ok=True, detail=detail)
    except sqlite3.Error as exc:
        return Check(name=f"index {table}", ok=False, detail=str(exc))


def _hashes(conn: sqlite3.Connection) -> Check:
    bad: list[str] = []
    count = 0
    for row in conn.execute("SELECT * FROM documents"):
        count += 1
        try:
            same = content_hash(to_content(row["id"], row)) == row["content_hash"]
        except (ValidationError, ValueError):
            same = False  # a row no save could have written
        if not same:
            bad.append(row["id"])
    detail = f"{count} documents match their hashes" if not bad else f"{len(bad)} differ: {bad[:5]}"
    return Check(name="content hashes", ok=not bad, detail=detail)


def _revisions(conn: sqlite3.Connection) -> Check:
    gaps = conn.execute(
        "SELECT d.id FROM documents d LEFT JOIN revisions r ON r.doc_key = d.key "
        "GROUP BY d.key HAVING count(r.revision) != d.revision - 1 OR coalesce(max(r.revision), 0) != d.revision - 1"
    ).fetchall()
    ok = not gaps
    return Check(
        name="revision history", ok=ok, detail="every revision is kept" if ok else f"gaps in {[g[0] for g in gaps[:5]]}"
    )


def copy_database(db_path: Path, target: Path) -> int:
    """Copy the live database to `target` with SQLite's online backup (consistent while others write), as one
    self-contained file; how many live documents it holds."""
    source = _connect(db_path, readonly=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest = sqlite3.connect(target)
        try:
            source.backup(dest)
            # One self-contained file: no -wal or -shm beside a backup.
            dest.execute("PRAGMA journal_mode=DELETE")
            documents: int = dest.execute("SELECT count(*) FROM documents WHERE deleted_at IS NULL").fetchone()[0]
        finally:
            dest.close()
    finally:
        source.close()
    return documents


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _carried_audit(db_path: Path, backup_path: Path) -> list[AuditRow]:
    """The audit entries of the database being replaced that are newer than anything in the backup: the trail must
    survive a restore (and the restore itself is the next entry)."""
    if not db_path.exists():
        return []
    with closing(sqlite3.connect(f"{backup_path.resolve().as_uri()}?mode=ro", uri=True)) as old:
        try:
            newest = old.execute("SELECT max(at) FROM audit").fetchone()[0] or ""
        except sqlite3.OperationalError:
            newest = ""  # a backup from before the audit trail existed: carry all of it
    with closing(sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)) as current:
        try:
            return current.execute(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE at > ? ORDER BY seq", (newest,)).fetchall()
        except sqlite3.OperationalError:
            return []  # the database being replaced has no audit trail yet


def replace_database(backup_path: Path, db_path: Path, restore_entry: Callable[[int], AuditRow]) -> str | None:
    """Replace the database at `db_path` with the backup, all or nothing, and give it a new identity; the current
    database is first copied beside it (its path is returned), and its audit entries newer than the backup's are
    carried over, followed by `restore_entry(how many were carried)`."""
    carried = _carried_audit(db_path, backup_path)
    saved: str | None = None
    if db_path.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        keep = db_path.with_name(f"{db_path.stem}.pre-restore-{stamp}.db")
        current = _connect(db_path, readonly=False)
        try:
            with sqlite3.connect(keep) as copy:
                current.backup(copy)
        finally:
            current.close()
        saved = str(keep)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    source = _connect(backup_path, readonly=True)
    try:
        dest = sqlite3.connect(db_path, timeout=10)
        try:
            source.backup(dest)  # page by page inside one transaction on the destination: all or nothing
            dest.execute("PRAGMA journal_mode=WAL")
            with dest:
                dest.execute("UPDATE meta SET value = ? WHERE key = 'database_id'", (uuid.uuid4().hex,))
                if _has_table(dest, "audit"):
                    rows = [*carried, restore_entry(len(carried))]
                    dest.executemany(f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ({', '.join('?' * 9)})", rows)
        finally:
            dest.close()
    finally:
        source.close()
    return saved
