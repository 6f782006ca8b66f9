"""Disaster recovery (spec section 9): online backups with retention, integrity verification, and restore."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from sage_server.audit import Entry
from sage_server.auth import current_caller
from sage_server.errors import Conflict, InvalidInput, Unavailable
from sage_server.locks import FileLock, serving_lock_path
from sage_server.migrate import migration_files
from sage_server.models import ComponentStatus
from sage_server.resources import migrations_dir
from sage_server.store import AUDIT_COLUMNS, content_hash, to_content

BACKUP_GLOB = "sage-*.db"
STATE_FILE = "state.json"


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
    seconds: float
    pruned: list[str]


class BackupState(BaseModel):
    """What the backup folder remembers across restarts and shares between the servers using it."""

    last_success: datetime | None = None
    last_backup: str | None = None
    last_failure: datetime | None = None
    last_error: str | None = None

    @property
    def failing(self) -> bool:
        """The most recent attempt failed."""
        return self.last_failure is not None and (self.last_success is None or self.last_failure > self.last_success)


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(backup_path: Path) -> Path:
    """Where the checksum of a backup is written: `sage-<time>.db.sha256` beside it."""
    return backup_path.with_name(backup_path.name + ".sha256")


def backup(db_path: Path, backup_dir: Path, retention_days: int) -> BackupReport:
    """Copy the live database with SQLite's online backup (consistent while others write), verify the copy, write
    its checksum beside it, then remove backups older than `retention_days`."""
    started = time.perf_counter()
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
    digest = _sha256(target)
    checksum_path(target).write_text(f"{digest}  {target.name}\n")
    return BackupReport(
        path=str(target),
        bytes=target.stat().st_size,
        sha256=digest,
        documents=documents,
        seconds=round(time.perf_counter() - started, 3),
        pruned=prune(backup_dir, retention_days, keep=target),
    )


def prune(backup_dir: Path, retention_days: int, keep: Path | None = None) -> list[str]:
    """Delete backups (and their checksums) older than `retention_days`; never the one just written."""
    cutoff = time.time() - retention_days * 86400
    removed = []
    for path in sorted(backup_dir.glob(BACKUP_GLOB)):
        if path != keep and path.stat().st_mtime < cutoff:
            path.unlink()
            checksum_path(path).unlink(missing_ok=True)
            removed.append(str(path))
    return removed


def read_state(backup_dir: Path) -> BackupState:
    """The backup folder's record of the last success and failure (empty when there is none, or it is unreadable:
    the next backup writes a fresh one)."""
    try:
        return BackupState.model_validate_json((backup_dir / STATE_FILE).read_bytes())
    except (OSError, ValidationError):
        return BackupState()


def record(backup_dir: Path, *, report: BackupReport | None = None, error: str | None = None) -> BackupState:
    """Remember a backup's success (`report`) or failure (`error`) in the backup folder."""
    state = read_state(backup_dir)
    now = datetime.now(UTC)
    if report is not None:
        state = state.model_copy(update={"last_success": now, "last_backup": report.path})
    if error is not None:
        state = state.model_copy(update={"last_failure": now, "last_error": error})
    backup_dir.mkdir(parents=True, exist_ok=True)
    temporary = backup_dir / f".{STATE_FILE}.{os.getpid()}"
    temporary.write_text(state.model_dump_json(indent=2))
    temporary.replace(backup_dir / STATE_FILE)  # atomic: a reader never sees half a file
    return state


def health_status(
    backup_dir: Path, interval_hours: float, since: datetime, error: str | None = None
) -> ComponentStatus:
    """The `backup` component of /health: disabled when backups are off; degraded when the last backup failed
    (`error` is a failure this process saw but could not record) or the newest is older than two intervals
    (counted from `since`, when the database was created, if there has been none)."""
    if interval_hours <= 0:
        return "disabled"
    state = read_state(backup_dir)
    if error is not None or state.failing:
        return "degraded"
    newest = state.last_success or since
    age = (datetime.now(UTC) - newest).total_seconds()
    return "degraded" if age > 2 * interval_hours * 3600 else "healthy"


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def check_checksum(backup_path: Path) -> None:
    """Refuse a backup whose bytes differ from the checksum written beside it, or that has none."""
    expected_file = checksum_path(backup_path)
    try:
        expected = expected_file.read_text(encoding="utf-8").split()[0]
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise InvalidInput(
            f"{backup_path}: no readable checksum beside it ({expected_file.name}); a backup written by `sage backup` "
            "has one. To restore a copy without it anyway, pass --no-checksum; nothing was changed",
            path=str(backup_path),
        ) from exc
    actual = _sha256(backup_path)
    if actual != expected:
        raise InvalidInput(
            f"{backup_path}: its sha256 is {actual[:16]}…, but {expected_file.name} says {expected[:16]}…; the file "
            "changed after the backup was written; nothing was changed",
            path=str(backup_path),
        )


def restore(backup_path: Path, db_path: Path, *, checksum: bool = True) -> str | None:
    """Replace the database with a verified backup, and give it a new identity (so no cache entry made before can
    answer for it). The current database is first saved beside it (`<name>.pre-restore-<time>.db`), whose path is
    returned. Refused while any SAGE process has the database open."""
    if checksum and backup_path.is_file():
        check_checksum(backup_path)
    report = verify(backup_path)
    if not report.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.checks if not c.ok)
        raise InvalidInput(f"{backup_path} is not a sound SAGE backup ({failed}); nothing was changed")
    with FileLock(serving_lock_path(db_path)) as in_use:
        if not in_use.acquire():
            raise Conflict(
                f"{db_path} is in use by a running SAGE server (sage serve or sage mcp); stop it first (Ctrl-C or "
                "SIGTERM, `docker stop`, or your service manager), then restore; nothing was changed",
                path=str(db_path),
            )
        return _replace_database(backup_path, db_path)


def _carried_audit(db_path: Path, backup_path: Path) -> list[tuple[object, ...]]:
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


def _replace_database(backup_path: Path, db_path: Path) -> str | None:
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
                    entry = Entry("restore_backup", target=str(backup_path), detail={"carried": len(carried)})
                    rows = [*carried, entry.row(current_caller())]
                    dest.executemany(f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ({', '.join('?' * 9)})", rows)
        finally:
            dest.close()
    finally:
        source.close()
    return saved
