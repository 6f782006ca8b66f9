"""Disaster recovery (spec section 9): online backups with retention, integrity verification, and restore."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from sage_server.errors import InvalidInput, Unavailable
from sage_server.migrate import migration_files
from sage_server.models import DocumentIn
from sage_server.resources import migrations_dir
from sage_server.store import content_hash

BACKUP_GLOB = "sage-*.db"


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


class BackupReport(BaseModel):
    """A backup written and verified, and the old ones removed by the retention policy."""

    path: str
    bytes: int
    sha256: str
    documents: int
    pruned: list[str]


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
    """Check a SAGE database: SQLite's integrity, the full-text indexes against their rows, the migrations against
    the shipped files; with `thorough`, every document's content hash and revision chain too."""
    # Read-write only because FTS5's integrity check is an INSERT in form; everything runs in a transaction
    # that is rolled back, so verifying changes nothing.
    conn = _connect(path, readonly=False)
    conn.isolation_level = None
    conn.execute("BEGIN")
    checks: list[Check] = []
    try:
        for query in QUICK_CHECKS:
            rows = conn.execute(query.sql).fetchall()
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
    # FTS5's own check; rank 1 makes it compare the index with the external content rows, not just itself.
    try:
        conn.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('integrity-check', 1)")
        return Check(name=f"index {table}", ok=True, detail="ok")
    except sqlite3.Error as exc:
        return Check(name=f"index {table}", ok=False, detail=str(exc))


def _hashes(conn: sqlite3.Connection) -> Check:
    bad: list[str] = []
    rows = conn.execute("SELECT id, title, layer, tags, triggers, summary, body, content_hash FROM documents")
    count = 0
    for doc_id, title, layer, tags, triggers, summary, body, stored in rows:
        count += 1
        doc = DocumentIn(
            id=doc_id,
            title=title,
            layer=layer,
            body=body,
            tags=json.loads(tags),
            triggers=json.loads(triggers),
            summary=summary,
        )
        if content_hash(doc) != stored:
            bad.append(doc_id)
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


def backup(db_path: Path, backup_dir: Path, retention_days: int) -> BackupReport:
    """Copy the live database with SQLite's online backup (consistent while others write), verify the copy, then
    remove backups older than `retention_days`."""
    source = _connect(db_path, readonly=True)
    backup_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = backup_dir / f"sage-{stamp}.db"
    partial = target.with_suffix(".partial")
    try:
        dest = sqlite3.connect(partial)
        try:
            source.backup(dest)
            # One self-contained file: no -wal or -shm beside a backup.
            dest.execute("PRAGMA journal_mode=DELETE")
            documents = dest.execute("SELECT count(*) FROM documents WHERE deleted_at IS NULL").fetchone()[0]
        finally:
            dest.close()
    finally:
        source.close()
    report = verify(partial)
    if not report.ok:
        partial.unlink(missing_ok=True)
        failed = [c.name for c in report.checks if not c.ok]
        raise Unavailable(f"the backup of {db_path} failed verification ({', '.join(failed)}); nothing was kept")
    partial.replace(target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    target.with_suffix(".db.sha256").write_text(f"{digest}  {target.name}\n")
    return BackupReport(
        path=str(target),
        bytes=target.stat().st_size,
        sha256=digest,
        documents=documents,
        pruned=prune(backup_dir, retention_days, keep=target),
    )


def prune(backup_dir: Path, retention_days: int, keep: Path | None = None) -> list[str]:
    """Delete backups (and their checksums) older than `retention_days`; never the one just written."""
    cutoff = time.time() - retention_days * 86400
    removed = []
    for path in sorted(backup_dir.glob(BACKUP_GLOB)):
        if path != keep and path.stat().st_mtime < cutoff:
            path.unlink()
            path.with_suffix(".db.sha256").unlink(missing_ok=True)
            removed.append(str(path))
    return removed


def restore(backup_path: Path, db_path: Path) -> str | None:
    """Replace the database with a verified backup. The current database is first saved beside it
    (`<name>.pre-restore-<time>.db`), whose path is returned. Stop servers using the database first."""
    report = verify(backup_path)
    if not report.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if not c.ok)
        raise InvalidInput(f"{backup_path} is not a sound SAGE backup ({failed}); nothing was changed")
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
        finally:
            dest.close()
    finally:
        source.close()
    return saved
