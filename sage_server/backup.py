"""Disaster recovery (spec section 9): online backups with retention, integrity verification, and restore.

A SQLite store is backed up as a copy of its file (`sage-<time>.db`); a PostgreSQL store as a portable export
(`sage-<time>.export.jsonl.gz`, export_format.py). Both get a `.sha256` beside them, are verified after writing,
share the retention and the state file, and are restored all or nothing after a safety copy of what they replace.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.to_thread
from pydantic import BaseModel, ValidationError

from sage_server import export_format
from sage_server.audit import Entry
from sage_server.auth import current_caller
from sage_server.config import Settings
from sage_server.errors import Conflict, InvalidInput, Unavailable
from sage_server.export import SUFFIX, export_settings, export_store, import_settings
from sage_server.export_format import checksum_path as checksum_path
from sage_server.export_format import is_export, sha256_of, verify_export
from sage_server.locks import FileLock, serving_lock_path
from sage_server.models import ComponentStatus
from sage_server.store import AuditRow, VerifyReport, open_store, sqlite_backup

BACKUP_GLOB = "sage-*.db"  # a SQLite store's backups
EXPORT_GLOB = f"sage-*{SUFFIX}"  # a PostgreSQL store's backups
STATE_FILE = "state.json"


def verify(path: Path, thorough: bool = False) -> VerifyReport:
    """Check a SAGE database file: SQLite's integrity, the full-text index against exactly the live documents, the
    migrations against the shipped files; with `thorough`, every document's content hash and revision chain too.
    An export (a PostgreSQL backup) is checked whole: checksum, format, hashes, revision chains, references."""
    if is_export(path):
        return verify_export(path)
    return sqlite_backup.verify(path, thorough)


def verify_live(settings: Settings) -> VerifyReport:
    """`sage verify` of the configured store: the SQLite file itself, or for PostgreSQL an export of it to a
    temporary file, checked as a backup is (hashes, revision chains, references) and then removed."""
    if settings.database_url is None:
        return verify(settings.db_path, thorough=True)
    with tempfile.TemporaryDirectory(prefix="sage-verify-") as folder:
        path = Path(folder) / f"live{SUFFIX}"
        anyio.run(export_settings, settings, path)
        report = verify_export(path)
    return report.model_copy(update={"path": open_store(settings).location})


def backups(backup_dir: Path) -> list[Path]:
    """The backups in a folder, of both kinds, oldest name first."""
    return sorted([*backup_dir.glob(BACKUP_GLOB), *backup_dir.glob(EXPORT_GLOB)])


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


def backup_store(settings: Settings, backup_dir: Path) -> BackupReport:
    """Back up the store the settings choose: a SQLite copy, or a PostgreSQL export (see backup_export)."""
    if settings.database_url is None:
        return backup(settings.db_path, backup_dir, settings.backup_retention_days)
    return anyio.run(backup_export, settings, backup_dir)


async def backup_export(settings: Settings, backup_dir: Path) -> BackupReport:
    """Export the PostgreSQL store from one snapshot (consistent while instances write) to
    `sage-<time>.export.jsonl.gz` with its checksum, verify it, then remove backups older than the retention."""
    started = time.perf_counter()
    target = backup_dir / f"sage-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}{SUFFIX}"
    store = open_store(settings.model_copy(update={"database_pool_size": 1}))
    await store.open()
    try:
        written = await export_store(store, target)
    finally:
        await store.close()
    report = await anyio.to_thread.run_sync(verify_export, target)
    if not report.ok:
        target.unlink(missing_ok=True)
        checksum_path(target).unlink(missing_ok=True)
        failed = [c.name for c in report.checks if not c.ok]
        raise Unavailable(f"the backup of {store.location} failed verification ({', '.join(failed)}); nothing was kept")
    return BackupReport(
        path=str(target),
        bytes=written.bytes,
        sha256=written.sha256,
        documents=written.counts["document"],
        seconds=round(time.perf_counter() - started, 3),
        pruned=prune(backup_dir, settings.backup_retention_days, keep=target),
    )


def backup(db_path: Path, backup_dir: Path, retention_days: int) -> BackupReport:
    """Copy the live database with SQLite's online backup (consistent while others write), verify the copy, write
    its checksum beside it, then remove backups older than `retention_days`."""
    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = backup_dir / f"sage-{stamp}.db"
    partial = target.with_suffix(".partial")
    documents = sqlite_backup.copy_database(db_path, partial)
    report = verify(partial)
    if not report.ok:
        partial.unlink(missing_ok=True)
        failed = [c.name for c in report.checks if not c.ok]
        raise Unavailable(f"the backup of {db_path} failed verification ({', '.join(failed)}); nothing was kept")
    partial.replace(target)
    digest = sha256_of(target)
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
    for path in backups(backup_dir):
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


def check_checksum(backup_path: Path) -> None:
    """Refuse a backup whose bytes differ from the checksum written beside it, or that has none."""
    export_format.check_checksum(backup_path)


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
        return sqlite_backup.replace_database(backup_path, db_path, _restore_entry(backup_path))


def restore_store(settings: Settings, backup_path: Path, *, checksum: bool = True, force: bool = False) -> str | None:
    """`sage restore --backup`: a SQLite copy replaces the SQLite file (restore); an export replaces what the
    configured store holds, SQLite or PostgreSQL, in one transaction after a safety export to the backup folder,
    with a new identity; refused while the store is served (SQLite's lock; PostgreSQL: any other client connected)
    unless `force`. The path of the safety copy is returned."""
    if is_export(backup_path):
        report = anyio.run(
            lambda: import_settings(
                settings, backup_path, replace=True, force=force, operation="restore_backup", checksum=checksum
            )
        )
        return report.replaced_saved_at
    if settings.database_url is not None:
        raise InvalidInput(
            f"{backup_path} is not an export: a PostgreSQL store is restored from an export (sage-*{SUFFIX}, what "
            "`sage backup` writes for it); to move a SQLite backup there, serve it with SQLite, `sage export` it "
            "and `sage import --from-export`; nothing was changed",
            path=str(backup_path),
        )
    return restore(backup_path, settings.db_path, checksum=checksum)


def _restore_entry(backup_path: Path) -> Callable[[int], AuditRow]:
    """The audit entry of a restore, once it is known how many newer entries of the replaced database it carries."""
    caller = current_caller()
    return lambda carried: Entry("restore_backup", target=str(backup_path), detail={"carried": carried}).row(caller)
