"""Disaster recovery (spec section 9): online backups with retention, integrity verification, and restore."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from sage_server.audit import Entry
from sage_server.auth import current_caller
from sage_server.config import Settings
from sage_server.errors import Conflict, InvalidInput, NotSupported, Unavailable
from sage_server.locks import FileLock, serving_lock_path
from sage_server.models import ComponentStatus
from sage_server.store import AuditRow, Store, VerifyReport, sqlite_backup

BACKUP_GLOB = "sage-*.db"
STATE_FILE = "state.json"


def verify(path: Path, thorough: bool = False) -> VerifyReport:
    """Check a SAGE database file: SQLite's integrity, the full-text index against exactly the live documents, the
    migrations against the shipped files; with `thorough`, every document's content hash and revision chain too."""
    return sqlite_backup.verify(path, thorough)


POSTGRESQL_NOT_YET = (
    "backup, restore --backup and verify of a PostgreSQL store (SAGE_DATABASE_URL) are not supported yet (issue "
    "19); back it up with PostgreSQL's own tools (pg_dump) meanwhile"
)


def database_file(store: Store) -> Path:
    """The file a store keeps its data in, which backups copy; refused for a database server."""
    if store.path is None:
        raise NotSupported(POSTGRESQL_NOT_YET, backend=store.backend)
    return store.path


def database_path(settings: Settings) -> Path:
    """The SQLite file the settings name, which `sage backup`, `restore --backup` and `verify` work on; refused
    when the settings choose PostgreSQL."""
    if settings.database_url is not None:
        raise NotSupported(POSTGRESQL_NOT_YET, backend="postgresql")
    return settings.db_path


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
        return sqlite_backup.replace_database(backup_path, db_path, _restore_entry(backup_path))


def _restore_entry(backup_path: Path) -> Callable[[int], AuditRow]:
    """The audit entry of a restore, once it is known how many newer entries of the replaced database it carries."""
    caller = current_caller()
    return lambda carried: Entry("restore_backup", target=str(backup_path), detail={"carried": carried}).row(caller)
