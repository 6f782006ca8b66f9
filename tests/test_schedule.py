"""The backup job of `sage serve`: first backup at start, one holder among servers, failures seen in /health,
configuration and metrics snapshots."""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from sage_server import backup, schedule, snapshots
from sage_server.config import Settings
from sage_server.errors import Unavailable
from sage_server.logs import JsonFormatter
from sage_server.schedule import BackupSchedule
from sage_server.service import open_service
from tests.conftest import make_settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def backed(tmp_path: Path, knowledge: Path) -> Settings:
    return make_settings(tmp_path, knowledge_dirs=[knowledge], backup_dir=tmp_path / "bk")


async def wait_for(condition: object, seconds: float = 20) -> None:
    with anyio.fail_after(seconds):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.02)


async def test_the_first_backup_happens_at_start(backed: Settings) -> None:
    async with open_service(backed) as kb, anyio.create_task_group() as tasks:
        tasks.start_soon(BackupSchedule(backed, kb).run)
        await wait_for(lambda: backup.read_state(backed.backup_dir).last_success is not None)
        tasks.cancel_scope.cancel()
    state = backup.read_state(backed.backup_dir)
    assert state.last_backup and Path(state.last_backup).is_file()
    assert backup.checksum_path(Path(state.last_backup)).is_file()


async def test_a_recent_backup_is_not_repeated_at_start(backed: Settings) -> None:
    async with open_service(backed) as kb:
        made = backup.backup(backed.db_path, backed.backup_dir, retention_days=90)
        backup.record(backed.backup_dir, report=made)
        job = BackupSchedule(backed, kb, lock_retry_seconds=0.05)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(job.run)
            await wait_for(lambda: job.holds_job)
            await anyio.sleep(0.3)
            tasks.cancel_scope.cancel()
    assert [p.name for p in backed.backup_dir.glob(backup.BACKUP_GLOB)] == [Path(made.path).name]


async def test_a_restart_after_an_interval_backs_up_again(backed: Settings) -> None:
    stale = backup.BackupState(last_success=datetime.fromtimestamp(time.time() - 25 * 3600, UTC))
    backed.backup_dir.mkdir()
    (backed.backup_dir / backup.STATE_FILE).write_text(stale.model_dump_json())
    async with open_service(backed) as kb, anyio.create_task_group() as tasks:
        tasks.start_soon(BackupSchedule(backed, kb).run)
        await wait_for(lambda: list(backed.backup_dir.glob(backup.BACKUP_GLOB)))
        tasks.cancel_scope.cancel()


async def test_one_server_holds_the_job_and_another_takes_over(backed: Settings, tmp_path: Path) -> None:
    async with open_service(backed) as first, open_service(backed) as second:
        a = BackupSchedule(backed, first, lock_retry_seconds=0.05)
        b = BackupSchedule(backed, second, lock_retry_seconds=0.05)
        async with anyio.create_task_group() as outer:
            async with anyio.create_task_group() as stops_first:
                stops_first.start_soon(a.run)
                await wait_for(lambda: a.holds_job)
                outer.start_soon(b.run)
                await anyio.sleep(0.3)
                assert not b.holds_job  # never both at once
                stops_first.cancel_scope.cancel()
            await wait_for(lambda: b.holds_job)
            assert not a.holds_job
            outer.cancel_scope.cancel()
    assert len(list(backed.backup_dir.glob(backup.BACKUP_GLOB))) == 1


async def test_a_failed_backup_is_logged_recorded_and_degrades_health(
    backed: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(*args: object) -> backup.BackupReport:
        raise Unavailable("the backup of sage.db failed verification (index docs_fts); nothing was kept")

    monkeypatch.setattr(backup, "backup", failing)
    caplog.set_level(logging.INFO)
    async with open_service(backed) as kb:
        assert await BackupSchedule(backed, kb).backup_now() is None
        health = await kb.health()
        assert health.components["backup"] == "degraded"
    state = backup.read_state(backed.backup_dir)
    assert state.failing and state.last_error and "failed verification" in state.last_error
    lines = [JsonFormatter().format(r) for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == 1 and "Backup failed" in lines[0] and "failed verification" in lines[0]


async def test_a_backup_folder_that_cannot_be_written_is_seen_in_health(backed: Settings) -> None:
    backed.backup_dir.parent.mkdir(parents=True, exist_ok=True)
    backed.backup_dir.write_text("a file where the folder should be")
    async with open_service(backed) as kb:
        assert await BackupSchedule(backed, kb).backup_now() is None
        assert kb.backup_error is not None
        assert (await kb.health()).components["backup"] == "degraded"


async def test_configuration_snapshots_on_change_with_secrets_masked(
    backed: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "sage.yaml"
    project.write_text("log_level: INFO\napi_key: hunter2\nredis_url: redis://sage:s3cret@cache:6379/0\n")
    env_file = tmp_path / ".env"
    env_file.write_text("SAGE_API_KEY=hunter2\nexport GITHUB_TOKEN = ghp_abc\nSAGE_DEBUG=false\n")
    monkeypatch.setattr(schedule, "config_files", lambda settings: [project, env_file, tmp_path / "absent.yaml"])
    async with open_service(backed) as kb:
        job = BackupSchedule(backed, kb, config_check_seconds=0.05)
        folder = backed.backup_dir / snapshots.CONFIG_FOLDER
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(job.run)
            await wait_for(lambda: len(list(folder.glob("config-*.txt"))) == 1)
            await anyio.sleep(0.3)
            assert len(list(folder.glob("config-*.txt"))) == 1  # unchanged: no new snapshot
            project.write_text("log_level: DEBUG\napi_key: hunter2\n")
            await wait_for(lambda: len(list(folder.glob("config-*.txt"))) == 2)
            tasks.cancel_scope.cancel()
    first, second = sorted(folder.glob("config-*.txt"))
    text = first.read_text()
    assert "hunter2" not in text and "s3cret" not in text and "ghp_abc" not in text
    assert "api_key: ********" in text and "redis://********@cache:6379/0" in text
    assert "SAGE_DEBUG=false" in text and "log_level: INFO" in text
    assert "log_level: DEBUG" in second.read_text()


def test_snapshots_are_pruned_by_age_keeping_the_newest(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    names = ["config-20200101T000000Z-aaa.txt", "config-20200201T000000Z-bbb.txt", "config-20200301T000000Z-ccc.txt"]
    old = time.time() - 40 * 86400
    for name in names:
        (folder / name).write_text("x")
        os.utime(folder / name, (old, old))
    removed = snapshots.prune_snapshots(folder, "config-*.txt", retention_days=30)
    assert [Path(p).name for p in removed] == names[:2]
    assert [p.name for p in folder.iterdir()] == names[2:]


async def test_metrics_snapshots(backed: Settings) -> None:
    async with open_service(backed) as kb:
        job = BackupSchedule(backed, kb, metrics_every_seconds=0.05)
        folder = backed.backup_dir / snapshots.METRICS_FOLDER
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(job.run)
            await wait_for(lambda: list(folder.glob("metrics-*.prom")))
            tasks.cancel_scope.cancel()
    text = next(folder.glob("metrics-*.prom")).read_text()
    assert "sage_documents{layer=" in text and "sage_backup_last_success_timestamp_seconds" in text


def test_masking() -> None:
    masked = snapshots.mask_secrets(
        'password: "x y"\nSECRET_THING=abc\nlog_level: keep\ndatabase_url: postgresql://me:pw@db:5432/sage\n'
    )
    assert masked == (
        "password: ********\nSECRET_THING=********\nlog_level: keep\ndatabase_url: postgresql://********@db:5432/sage\n"
    )
