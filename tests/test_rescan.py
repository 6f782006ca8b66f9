"""Re-scanning imported folders: a file whose size, times and inode are the stored ones is not read again; any
change to them makes it read, and everything reconciliation decides stays as when every file is read."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sage_server import ingest
from sage_server.config import Settings
from sage_server.models import ImportReport
from sage_server.service import KnowledgeService, open_service
from tests.conftest import BACKENDS, SAMPLE, database_for, make_settings, write_doc

pytestmark = pytest.mark.anyio


@pytest.fixture
def trusted_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust the times of files just written (the tests write them a moment before importing them)."""
    monkeypatch.setattr(ingest, "RACY_NS", 0)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files imports read (by their path relative to the knowledge folder), in order."""
    read: list[str] = []
    parse = ingest.parse_file

    def recording(path: Path, root: Path, settings: Settings, **kwargs: object) -> ingest.ParsedFile:
        read.append(str(path.relative_to(root)))
        return parse(path, root, settings, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest, "parse_file", recording)
    return read


@pytest.fixture(params=BACKENDS)
async def kb(
    request: pytest.FixtureRequest, tmp_path: Path, knowledge: Path, trusted_times: None
) -> AsyncIterator[KnowledgeService]:
    async with database_for(request.param) as backend:
        async with open_service(make_settings(tmp_path, knowledge_dirs=[knowledge], **backend)) as service:
            yield service


def counts(report: ImportReport) -> tuple[int, int, int, int]:
    return report.unchanged, report.created, report.updated, report.removed


def rewrite_keeping_times(path: Path, text: str) -> None:
    """Write `text` (the same size as before) and put the old modification time back."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


async def test_a_rescan_of_unchanged_files_reads_none(kb: KnowledgeService, knowledge: Path, reads: list[str]) -> None:
    generation = (await kb.info()).generation
    report = await kb.import_paths([knowledge])
    assert counts(report) == (4, 0, 0, 0) and report.scanned == 4
    assert reads == []
    assert (await kb.info()).generation == generation


async def test_a_touched_file_is_read_and_only_its_stat_refreshed(
    kb: KnowledgeService, knowledge: Path, reads: list[str]
) -> None:
    generation = (await kb.info()).generation
    touched = knowledge / "core/honesty.md"
    earlier = touched.stat().st_mtime_ns - 5_000_000_000  # (a time ahead of the clock is never trusted)
    os.utime(touched, ns=(earlier, earlier))
    assert counts(await kb.import_paths([knowledge])) == (4, 0, 0, 0)
    assert reads == ["core/honesty.md"]
    assert [r.revision for r in (await kb.history("honesty")).revisions] == [1]
    assert (await kb.info()).generation == generation
    reads.clear()
    await kb.import_paths([knowledge])
    assert reads == []  # the stat it saw was kept


async def test_a_same_size_rewrite_with_the_old_mtime_is_read(
    kb: KnowledgeService, knowledge: Path, reads: list[str]
) -> None:
    path = knowledge / "core/honesty.md"
    rewrite_keeping_times(path, SAMPLE["core/honesty.md"].replace("Report only", "Report ONLY"))
    assert counts(await kb.import_paths([knowledge])) == (3, 0, 1, 0)  # the change time moved
    assert reads == ["core/honesty.md"]
    assert "Report ONLY" in (await kb.get("honesty")).body


async def test_a_file_replaced_by_a_rename_is_read(
    kb: KnowledgeService, knowledge: Path, reads: list[str], tmp_path: Path
) -> None:
    path = knowledge / "frameworks/timeouts.md"
    before = path.stat()
    replacement = tmp_path / "replacement.md"
    replacement.write_text(SAMPLE["frameworks/timeouts.md"].replace("deadline.", "DEADLINE."), encoding="utf-8")
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)
    assert path.stat().st_size == before.st_size and path.stat().st_ino != before.st_ino
    assert counts(await kb.import_paths([knowledge])) == (3, 0, 1, 0)
    assert reads == ["frameworks/timeouts.md"]


async def test_deleted_moved_and_renamed_files_are_reconciled_as_before(
    kb: KnowledgeService, knowledge: Path, reads: list[str]
) -> None:
    (knowledge / "practices/secrets.md").unlink()
    (knowledge / "core/honesty.md").rename(knowledge / "core/moved.md")  # explicit id: keeps its history
    (knowledge / "scenarios/plain-note.md").rename(knowledge / "scenarios/renamed.md")  # derived id: a new one
    report = await kb.import_paths([knowledge])
    assert counts(report) == (1, 1, 1, 2)
    assert sorted(reads) == ["core/moved.md", "scenarios/renamed.md"]
    assert (await kb.history("handling-secrets")).deleted
    assert (await kb.history("scenarios.plain-note")).deleted
    honesty = await kb.get("honesty")
    assert honesty.revision == 2 and honesty.source_path == str(knowledge.resolve() / "core/moved.md")
    assert (await kb.get("scenarios.renamed")).title == "Production Incident Notes"

    reads.clear()
    write_doc(knowledge, "practices/secrets.md", SAMPLE["practices/secrets.md"])  # back: its document returns
    assert counts(await kb.import_paths([knowledge])) == (3, 0, 1, 0)
    assert reads == ["practices/secrets.md"]
    assert not (await kb.get("handling-secrets")).deleted


async def test_a_new_file_taking_an_unread_files_id_is_a_duplicate_as_before(
    kb: KnowledgeService, knowledge: Path, reads: list[str]
) -> None:
    write_doc(knowledge, "practices/dup.md", "---\nid: honesty\n---\n# Duplicate\n\ntext\n")
    report = await kb.import_paths([knowledge])
    assert counts(report) == (4, 0, 0, 0)
    assert [(s.path.rsplit("/", 1)[-1], s.reason) for s in report.skipped] == [
        ("dup.md", f"duplicate id 'honesty': already used by {knowledge.resolve() / 'core/honesty.md'}")
    ]
    assert sorted(reads) == ["core/honesty.md", "practices/dup.md"]  # the holder was read to decide


async def test_files_changed_moments_ago_are_read_again(
    tmp_path: Path, knowledge: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rewritten within the same clock tick with the same size, a file would keep its times: a file changed less than
    # RACY_NS before it was read is not trusted to be unchanged until it is read again.
    async with open_service(make_settings(tmp_path, knowledge_dirs=[knowledge])) as kb:
        reads.clear()
        await kb.import_paths([knowledge])
        assert len(reads) == 4
        monkeypatch.setattr(ingest, "RACY_NS", 0)  # as if two seconds had passed
        reads.clear()
        assert counts(await kb.import_paths([knowledge])) == (4, 0, 0, 0)
        assert len(reads) == 4
        reads.clear()
        await kb.import_paths([knowledge])
        assert reads == []


async def test_files_are_read_again_under_other_layers(
    tmp_path: Path, knowledge: Path, reads: list[str], trusted_times: None
) -> None:
    async with open_service(make_settings(tmp_path, knowledge_dirs=[knowledge])):
        pass
    reads.clear()
    layers = ["guidelines", "frameworks", "practices", "scenarios", "templates"]  # no core
    async with open_service(make_settings(tmp_path, knowledge_dirs=[knowledge], layers=layers)) as kb:
        assert len(reads) == 4
        report = kb.last_import
        assert report is not None
        assert [s.reason for s in report.skipped] == ["unknown layer 'core' (known: " + ", ".join(layers) + ")"]
