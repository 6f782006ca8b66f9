"""Backups of a PostgreSQL store: an export in the backup folder, verified after writing and by `sage verify`
(checksum, format, hashes, revision chains), pruned with the SQLite backups, restored in one transaction after a
safety export (refused while instances are connected unless forced), and the scheduled job held by one instance
through an advisory lock."""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from sage_server import backup
from sage_server.config import Settings
from sage_server.errors import Conflict, InvalidInput
from sage_server.export_format import write_checksum
from sage_server.models import DocumentIn
from sage_server.schedule import BackupSchedule
from sage_server.service import open_service
from tests.conftest import make_settings, sage_env, sage_runner
from tests.postgres_support import scratch_database

pytestmark = pytest.mark.anyio


@pytest.fixture
async def on_postgres(tmp_path: Path, knowledge: Path) -> AsyncIterator[Settings]:
    async with scratch_database() as url:
        yield make_settings(tmp_path, knowledge_dirs=[knowledge], database_url=url, backup_dir=tmp_path / "bk")


def doc(doc_id: str, body: str = "# Title\n\nText.\n") -> DocumentIn:
    return DocumentIn.model_validate({"id": doc_id, "title": doc_id.title(), "layer": "practices", "body": body})


def failed_checks(path: Path) -> set[str]:
    return {c.name for c in backup.verify(path).checks if not c.ok}


def rewrite(source: Path, target: Path, change: object) -> None:
    """Copy an export with its lines changed by `change(lines)`, and a checksum that matches the changed copy."""
    with gzip.open(source, "rt") as lines:
        kept = change(lines.read().splitlines())  # type: ignore[operator]
    with gzip.open(target, "wt") as out:
        out.write("\n".join(kept) + "\n")
    write_checksum(target)


def drop_a_revision_and_recount(lines: list[str]) -> list[str]:
    """Leave out a document's first revision, with header and end counts that agree with what is left."""
    first = next(n for n, line in enumerate(lines) if '"type":"revision"' in line)
    kept = lines[:first] + lines[first + 1 :]
    head, end = json.loads(kept[0]), json.loads(kept[-1])
    head["counts"]["revision"] -= 1
    end["counts"]["revision"] -= 1
    return [json.dumps(head), *kept[1:-1], json.dumps(end, separators=(",", ":"))]


async def test_a_backup_is_a_verified_export_and_verify_finds_damage(on_postgres: Settings, tmp_path: Path) -> None:
    async with open_service(on_postgres) as kb:
        await kb.save(doc("kept"))
        await kb.save(doc("kept", "# Title\n\nSecond.\n"))
    report = await anyio.to_thread.run_sync(backup.backup_store, on_postgres, on_postgres.backup_dir)
    made = Path(report.path)
    assert made.name.startswith("sage-") and made.name.endswith(".export.jsonl.gz") and report.documents == 5
    assert backup.verify(made).ok and backup.checksum_path(made).is_file()

    tampered = tmp_path / "tampered.export.jsonl.gz"
    rewrite(made, tampered, lambda lines: [line.replace("Second.", "Third.") for line in lines])
    assert failed_checks(tampered) == {"content hashes"}
    gap = tmp_path / "gap.export.jsonl.gz"
    rewrite(made, gap, lambda lines: [line for line in lines if '"type":"revision"' not in line])
    assert failed_checks(gap) == {"format"}  # the counts no longer match: a lost line is noticed
    chain = tmp_path / "chain.export.jsonl.gz"
    rewrite(made, chain, drop_a_revision_and_recount)
    assert failed_checks(chain) == {"revision history"}  # counts agree, the chain has a gap
    stale_checksum = tmp_path / "copy.export.jsonl.gz"
    stale_checksum.write_bytes(tampered.read_bytes())
    backup.checksum_path(stale_checksum).write_text(backup.checksum_path(made).read_text())
    assert "checksum" in failed_checks(stale_checksum)


async def test_restore_replaces_everything_after_a_safety_export_and_keeps_the_trail(
    on_postgres: Settings, tmp_path: Path
) -> None:
    async with open_service(on_postgres) as kb:
        await kb.save(doc("kept"))
        report = await anyio.to_thread.run_sync(backup.backup_store, on_postgres, on_postgres.backup_dir)
        await kb.save(doc("kept", "# Title\n\nAfter the backup.\n"))
        await kb.save(doc("later"))
        await kb.create_key("made-later", "read")
        identity, generation = kb.database_id, kb.generation
        with pytest.raises(Conflict, match="other clients connected"):  # an instance is running
            await anyio.to_thread.run_sync(lambda: backup.restore_store(on_postgres, Path(report.path)))
    made = Path(report.path)
    copy = tmp_path / "copy.export.jsonl.gz"
    copy.write_bytes(made.read_bytes()[:-10] + b"0123456789")
    backup.checksum_path(copy).write_text(backup.checksum_path(made).read_text())
    with pytest.raises(InvalidInput, match="sha256"):
        await anyio.to_thread.run_sync(backup.restore_store, on_postgres, copy)
    not_an_export = tmp_path / "sage-x.db"
    not_an_export.write_bytes(b"SQLite format 3\x00")
    with pytest.raises(InvalidInput, match="not an export"):
        backup.restore_store(on_postgres, not_an_export, checksum=False)

    saved = await anyio.to_thread.run_sync(backup.restore_store, on_postgres, made)
    assert saved is not None and Path(saved).name.startswith("pre-restore-")
    async with open_service(on_postgres) as kb:
        assert (await kb.get("kept")).revision == 1
        assert (await kb.info()).documents == 5  # "later" is gone, as it was not in the backup
        assert [k.name for k in (await kb.list_keys()).keys] == []
        assert kb.database_id != identity and kb.generation > generation
        trail = [(e.operation, e.target) for e in (await kb.audit_trail(limit=1000)).entries]
        assert ("key_create", "made-later") in trail  # written after the backup, carried over
        assert trail.index(("restore_backup", str(made))) > trail.index(("key_create", "made-later"))
    with gzip.open(saved, "rt") as lines:
        assert any('"id":"later"' in line for line in lines)  # what was replaced is in the safety export


def test_retention_prunes_both_kinds(tmp_path: Path) -> None:
    folder = tmp_path / "backups"
    folder.mkdir()
    old_export, new_export = folder / "sage-1.export.jsonl.gz", folder / "sage-2.export.jsonl.gz"
    old_db = folder / "sage-1.db"
    for path in (old_export, new_export, old_db):
        path.write_bytes(b"x")
        backup.checksum_path(path).write_text("x")
    long_ago = time.time() - 100 * 86400
    for path in (old_export, old_db):
        os.utime(path, (long_ago, long_ago))
    assert sorted(backup.prune(folder, retention_days=90)) == sorted([str(old_export), str(old_db)])
    assert sorted(p.name for p in folder.iterdir()) == ["sage-2.export.jsonl.gz", "sage-2.export.jsonl.gz.sha256"]


async def test_one_instance_holds_the_job_through_an_advisory_lock(on_postgres: Settings) -> None:
    async with open_service(on_postgres) as first, open_service(on_postgres) as second:
        a = BackupSchedule(on_postgres, first, lock_retry_seconds=0.05)
        b = BackupSchedule(on_postgres, second, lock_retry_seconds=0.05)
        async with anyio.create_task_group() as outer:
            async with anyio.create_task_group() as stops_first:
                stops_first.start_soon(a.run)
                with anyio.fail_after(20):
                    while not a.holds_job:
                        await anyio.sleep(0.02)
                outer.start_soon(b.run)
                await anyio.sleep(0.3)
                assert not b.holds_job  # never both at once
                with anyio.fail_after(30):  # the first backup at start, by the holder
                    while backup.read_state(on_postgres.backup_dir).last_success is None:
                        await anyio.sleep(0.05)
                stops_first.cancel_scope.cancel()
            with anyio.fail_after(20):
                while not b.holds_job:
                    await anyio.sleep(0.02)
            outer.cancel_scope.cancel()
        assert (await second.health()).components["backup"] == "healthy"
    made = list(on_postgres.backup_dir.glob(backup.EXPORT_GLOB))
    assert len(made) == 1 and backup.verify(made[0]).ok


async def test_the_command_line_backs_up_verifies_and_restores_postgresql(
    tmp_path: Path, knowledge: Path, on_postgres: Settings
) -> None:
    assert on_postgres.database_url is not None
    env = sage_env(
        tmp_path,
        SAGE_DATABASE_URL=on_postgres.database_url.get_secret_value(),
        SAGE_KNOWLEDGE_DIRS=str(knowledge),
        SAGE_BUNDLED_KNOWLEDGE="false",
        SAGE_BACKUP_DIR=str(tmp_path / "bk"),
    )
    sage = sage_runner(tmp_path, env)
    assert (await anyio.to_thread.run_sync(sage, "info")).returncode == 0  # imports the knowledge folder
    made = await anyio.to_thread.run_sync(sage, "backup", "--json")
    assert made.returncode == 0, made.stderr
    path = json.loads(made.stdout)["path"]
    assert path.endswith(".export.jsonl.gz") and json.loads(made.stdout)["documents"] == 4
    checked = await anyio.to_thread.run_sync(sage, "verify", "--path", path)
    assert checked.returncode == 0 and "ok    content hashes" in checked.stdout
    live = await anyio.to_thread.run_sync(sage, "verify")
    assert live.returncode == 0 and "revision history" in live.stdout
    restored = await anyio.to_thread.run_sync(sage, "restore", "--backup", path)
    assert restored.returncode == 0, restored.stderr
    assert "restored postgresql://" in restored.stdout and "pre-restore-" in restored.stdout
