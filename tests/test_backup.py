"""Disaster recovery: online backups that verify, retention, `sage verify --all`, and restore from a backup."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sage_server import backup
from sage_server.config import Settings
from sage_server.errors import InvalidInput, Unavailable
from sage_server.models import DocumentIn
from sage_server.service import open_service
from tests.conftest import sage_env

pytestmark = pytest.mark.anyio


async def test_backup_is_consistent_verified_and_restorable(settings: Settings, tmp_path: Path) -> None:
    async with open_service(settings) as kb:
        await kb.save(DocumentIn(id="kept", title="Kept", layer="core", body="Before the backup."))
        report = backup.backup(settings.db_path, tmp_path / "backups", retention_days=90)
        await kb.save(DocumentIn(id="kept", title="Kept", layer="core", body="After the backup."))
    assert report.documents == 5 and Path(report.path).is_file()
    assert Path(report.path).with_suffix(".db.sha256").read_text().startswith(report.sha256)
    assert backup.verify(Path(report.path), thorough=True).ok

    saved = backup.restore(Path(report.path), settings.db_path)
    assert saved and Path(saved).is_file()
    async with open_service(settings.model_copy(update={"import_on_start": False})) as kb:
        assert (await kb.get("kept")).body == "Before the backup."
    assert backup.verify(settings.db_path, thorough=True).ok


async def test_verify_finds_a_damaged_index_and_a_tampered_document(settings: Settings) -> None:
    async with open_service(settings):
        pass
    assert backup.verify(settings.db_path, thorough=True).ok
    with sqlite3.connect(settings.db_path) as conn:
        # Change a body behind SAGE's back, bypassing the triggers that keep the index in step.
        conn.execute("DROP TRIGGER documents_au")
        conn.execute("UPDATE documents SET body = 'tampered' WHERE id = 'honesty'")
    report = backup.verify(settings.db_path, thorough=True)
    failed = {c.name for c in report.checks if not c.ok}
    assert not report.ok and {"index docs_fts", "content hashes"} <= failed


def test_restore_refuses_what_is_not_a_backup(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(Unavailable, match="cannot open as a SQLite database"):
        backup.restore(junk, tmp_path / "live.db")
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(InvalidInput, match="not a sound SAGE backup.*not a SAGE database"):
        backup.restore(empty, tmp_path / "live.db")
    assert not (tmp_path / "live.db").exists()


def test_retention_prunes_only_old_backups(tmp_path: Path) -> None:
    folder = tmp_path / "backups"
    folder.mkdir()
    old, recent = folder / "sage-20200101T000000Z.db", folder / "sage-20990101T000000Z.db"
    for path in (old, recent):
        path.write_bytes(b"x")
        path.with_suffix(".db.sha256").write_text("x")
    stale = time.time() - 91 * 86400
    os.utime(old, (stale, stale))
    assert backup.prune(folder, retention_days=90) == [str(old)]
    assert sorted(p.name for p in folder.iterdir()) == [recent.name, recent.name + ".sha256"]


def test_cli_backup_verify_restore(tmp_path: Path, knowledge: Path) -> None:
    env = sage_env(
        tmp_path,
        SAGE_DB_PATH=str(tmp_path / "cli.db"),
        SAGE_BUNDLED_KNOWLEDGE="false",
        SAGE_KNOWLEDGE_DIRS=str(knowledge),
        SAGE_BACKUP_DIR=str(tmp_path / "bk"),
    )

    def sage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sage_server", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert sage("backup").returncode == 2  # no database yet: a clear error, not an empty backup
    assert sage("info").returncode == 0
    made = sage("backup", "--json")
    assert made.returncode == 0, made.stderr
    path = json.loads(made.stdout)["path"]
    assert sage("verify", "--all").returncode == 0
    assert sage("delete", "honesty").returncode == 0
    restored = sage("restore", "--backup", path)
    assert restored.returncode == 0 and "previous database is at" in restored.stdout
    assert sage("get", "honesty").returncode == 0
    assert sage("restore", "--backup", str(tmp_path / "missing.db")).returncode == 2
    assert sage("restore").returncode == 2
