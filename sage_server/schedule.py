"""The backup job of `sage serve` (spec 9.1): the knowledge base daily, the configuration on change, the metrics
hourly, each kept for its retention.

Several servers may share one database and one backup folder: one of them at a time holds the job (SQLite: a lock
file in the backup folder, released by the operating system if that server dies; PostgreSQL: an advisory lock of
the database, released when that server's connection ends), and another takes over when it stops. The last
success and failure are kept in the backup folder, so a server restarted more often than the interval still backs
up, and every server's /health sees a failure.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import anyio
import anyio.to_thread

from sage_server import backup, snapshots
from sage_server.config import Settings, config_files
from sage_server.errors import SageError
from sage_server.logs import get_logger, log_event
from sage_server.service import KnowledgeService

log = get_logger("backup")
CONFIG_RETENTION_DAYS = 30
METRICS_RETENTION_DAYS = 7
# A failed backup is tried again this soon (or at the interval, if that is shorter).
RETRY_SECONDS = 3600.0
# How long to sleep at most between checks, so a manual `sage backup` or a changed interval is noticed.
MAX_SLEEP_SECONDS = 3600.0


class BackupSchedule:
    """Run the backups for `service` until cancelled. Timings are arguments so tests can run in seconds."""

    def __init__(
        self,
        settings: Settings,
        service: KnowledgeService,
        *,
        config_check_seconds: float = 60.0,
        metrics_every_seconds: float = 3600.0,
        lock_retry_seconds: float = 60.0,
    ) -> None:
        self.settings = settings
        self.service = service
        self.folder = settings.backup_dir
        self.interval = settings.backup_interval_hours * 3600
        self.config_check_seconds = config_check_seconds
        self.metrics_every_seconds = metrics_every_seconds
        self.lock_retry_seconds = lock_retry_seconds
        self.instance = f"{socket.gethostname()}-{os.getpid()}"
        self.holds_job = False

    async def run(self) -> None:
        """Every instance snapshots its own metrics; the one holding the job lock backs up the rest."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._metrics)
            tasks.start_soon(self._job)

    async def _job(self) -> None:
        while True:
            try:
                # A lock file in the backup folder for SQLite; an advisory lock of the database for PostgreSQL.
                async with self.service.store.job_lock(self.folder) as held:
                    if held:
                        await self._hold_job()
            except OSError as exc:
                self._failed(f"cannot use the backup folder {self.folder}: {exc}")
            except SageError as exc:
                self._failed(f"cannot take the backup job's lock: {exc.message}")
            await anyio.sleep(self.lock_retry_seconds)  # another server holds the job; take over if it stops

    async def _hold_job(self) -> None:
        self.holds_job = True
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._knowledge_base)
                tasks.start_soon(self._configuration)
        finally:
            self.holds_job = False

    async def _knowledge_base(self) -> None:
        while True:
            wait = self._seconds_until_due()
            if wait > 0:
                await anyio.sleep(min(wait, MAX_SLEEP_SECONDS))
                continue
            await self.backup_now()

    def _seconds_until_due(self) -> float:
        state = backup.read_state(self.folder)
        now = time.time()
        if state.failing and state.last_failure is not None:
            return state.last_failure.timestamp() + min(RETRY_SECONDS, self.interval) - now
        last = state.last_success.timestamp() if state.last_success else _newest_backup(self.folder)
        return 0.0 if last is None else last + self.interval - now

    async def backup_now(self) -> backup.BackupReport | None:
        """Back the database up now and record the outcome; a failure is logged and recorded, never raised."""
        try:
            source = self.service.store.path
            if source is not None:
                retention = self.settings.backup_retention_days
                report = await anyio.to_thread.run_sync(backup.backup, source, self.folder, retention)
            else:  # PostgreSQL: an export, written in a thread of its own (its own event loop and connection)
                report = await anyio.to_thread.run_sync(backup.backup_store, self.settings, self.folder)
        except (SageError, OSError) as exc:
            self._failed(exc.message if isinstance(exc, SageError) else f"{type(exc).__name__}: {exc}")
            return None
        try:
            backup.record(self.folder, report=report)
        except OSError as exc:
            self._failed(f"the backup was written but its state could not be: {exc}")
        self.service.backup_error = None
        log_event(
            log,
            logging.INFO,
            "Backup written",
            operation="backup",
            path=report.path,
            documents=report.documents,
            bytes=report.bytes,
            duration_ms=round(report.seconds * 1000, 1),
            pruned=len(report.pruned),
        )
        return report

    def _failed(self, error: str) -> None:
        # Kept in this process too: a backup folder that cannot be written cannot record its own failure.
        self.service.backup_error = error
        log_event(log, logging.ERROR, "Backup failed", operation="backup", error=error, folder=str(self.folder))
        try:
            backup.record(self.folder, error=error)
        except OSError:
            pass  # already logged and kept in memory

    async def _configuration(self) -> None:
        while True:
            try:
                written = await anyio.to_thread.run_sync(self._snapshot_configuration)
            except OSError as exc:
                log_event(log, logging.ERROR, "Configuration snapshot failed", operation="backup", error=str(exc))
            else:
                if written is not None:
                    log_event(log, logging.INFO, "Configuration snapshot written", operation="backup", path=written)
            await anyio.sleep(self.config_check_seconds)

    def _snapshot_configuration(self) -> str | None:
        written = snapshots.snapshot_config(config_files(self.settings), self.folder)
        snapshots.prune_snapshots(self.folder / snapshots.CONFIG_FOLDER, "config-*.txt", CONFIG_RETENTION_DAYS)
        return str(written) if written else None

    async def _metrics(self) -> None:
        while True:
            await anyio.sleep(self.metrics_every_seconds)
            try:
                exposition = await self.service.scrape_metrics()
                await anyio.to_thread.run_sync(snapshots.snapshot_metrics, exposition, self.folder, self.instance)
                await anyio.to_thread.run_sync(
                    snapshots.prune_snapshots,
                    self.folder / snapshots.METRICS_FOLDER,
                    "metrics-*.prom",
                    METRICS_RETENTION_DAYS,
                )
            except (OSError, SageError) as exc:
                log_event(log, logging.ERROR, "Metrics snapshot failed", operation="backup", error=str(exc))


def _newest_backup(folder: Path) -> float | None:
    times = [path.stat().st_mtime for path in backup.backups(folder)]
    return max(times, default=None)
