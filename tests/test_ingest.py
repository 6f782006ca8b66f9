"""Importing Markdown folders: incremental, transactional, and clear about every file it skips."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import pytest

from sage_server import ingest
from sage_server.config import Settings
from sage_server.ingest import collect
from sage_server.models import DocumentIn
from sage_server.service import KnowledgeService, open_service
from sage_server.store.sqlite_documents import SqliteWriter
from tests.conftest import assert_index_consistent, make_settings, sqlite_db, write_doc

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True, params=["one-chunk", "file-by-file"])
def hand_over(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test twice: new files handed to the import (and written early) all at once, and one by one, so a
    file read later can take the id of one already written."""
    if request.param == "file-by-file":
        monkeypatch.setattr(ingest, "HAND_OVER", 1)


async def test_start_imports_configured_folders(service: KnowledgeService) -> None:
    report = service.last_import
    assert report is not None and (report.created, report.skipped) == (4, [])
    plain = await service.get("scenarios.plain-note")
    assert (plain.layer, plain.title) == ("scenarios", "Production Incident Notes")
    assert plain.summary == "Stabilise first, then find the cause."
    assert plain.source_path and plain.source_path.endswith("plain-note.md")


async def test_reimport_is_incremental(service: KnowledgeService, knowledge: Path) -> None:
    report = await service.import_paths([knowledge])
    assert (report.unchanged, report.created, report.updated, report.removed) == (4, 0, 0, 0)
    generation = (await service.info()).generation

    write_doc(knowledge, "frameworks/timeouts.md", (knowledge / "frameworks/timeouts.md").read_text() + "\nHedging.\n")
    (knowledge / "scenarios/plain-note.md").unlink()
    write_doc(knowledge, "templates/new.md", "# New Template\n\nFill me in.\n")
    report = await service.import_paths([knowledge])
    assert (report.unchanged, report.created, report.updated, report.removed) == (2, 1, 1, 1)
    assert (await service.get("timeout-resilience")).revision == 2
    assert (await service.history("scenarios.plain-note")).deleted
    assert [h.id for h in (await service.search("hedging")).hits] == ["timeout-resilience"]
    assert (await service.info()).generation == generation + 1

    write_doc(knowledge, "scenarios/plain-note.md", "# Production Incident Notes\n\nBack again.\n")
    report = await service.import_paths([knowledge])
    assert report.updated == 1 and not (await service.get("scenarios.plain-note")).deleted
    await assert_index_consistent(service)


async def test_api_edit_of_an_unchanged_file_survives_reimport(service: KnowledgeService, knowledge: Path) -> None:
    current = await service.get("honesty")
    edited = DocumentIn(id="honesty", title=current.title, layer="core", body="Edited through the API.\n")
    await service.save(edited)
    report = await service.import_paths([knowledge])
    assert report.unchanged == 4
    assert (await service.get("honesty")).body == "Edited through the API.\n"


BAD_FILES: dict[str, bytes] = {
    "practices/bad-yaml.md": b"---\ntitle: [unclosed\n---\n# Body\n",
    "practices/latin1.md": "# Caf\xe9\n".encode("latin-1"),
    "practices/binary.md": b"\x89PNG\x00\x00\x00",
    "practices/empty.md": b"   \n",
    "practices/huge.md": b"# Huge\n" + b"x" * 5000,
    "practices/dup.md": b"---\nid: honesty\n---\n# Duplicate\n\ntext\n",
    "practices/wrong-layer.md": b"---\nlayer: recipes\n---\n# Wrong\n\ntext\n",
    "practices/bad-tags.md": b"---\ntags: {a: 1}\n---\n# Tags\n\ntext\n",
    "practices/only-frontmatter.md": b"---\ntitle: Nothing\n---\n",
}
REASONS = {
    "bad-yaml.md": "invalid YAML frontmatter at line 3",
    "latin1.md": "not UTF-8",
    "binary.md": "binary file",
    "empty.md": "empty file",
    "huge.md": "over the 2048-byte limit",
    "dup.md": "duplicate id 'honesty'",
    "wrong-layer.md": "unknown layer 'recipes'",
    "bad-tags.md": "'tags' must be a list of strings",
    "only-frontmatter.md": "no Markdown content",
}


async def test_bad_files_are_reported_and_the_rest_imports(tmp_path: Path, knowledge: Path) -> None:
    for relative, data in BAD_FILES.items():
        (knowledge / relative).parent.mkdir(parents=True, exist_ok=True)
        (knowledge / relative).write_bytes(data)
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], max_file_bytes=2048)
    async with open_service(settings) as kb:
        report = kb.last_import
        assert report is not None and report.created == 4
        reasons = {Path(s.path).name: s.reason for s in report.skipped}
        assert set(reasons) == set(REASONS)
        for name, expected in REASONS.items():
            assert expected in reasons[name], (name, reasons[name])


async def test_symlinks_leaving_the_folder_are_not_followed(tmp_path: Path, knowledge: Path) -> None:
    outside = write_doc(tmp_path / "outside", "secret.md", "# Zanzibar\n\nnot for import\n")
    os.symlink(outside, knowledge / "practices" / "link.md")
    os.symlink(tmp_path / "outside", knowledge / "practices" / "linked-folder")
    async with open_service(make_settings(tmp_path, knowledge_dirs=[knowledge])) as kb:
        report = kb.last_import
        assert report is not None and report.created == 4
        assert [s.reason for s in report.skipped] == ["symlink points outside the imported folder; not followed"]
        assert (await kb.search("zanzibar")).hits == []


async def test_an_interrupted_import_leaves_the_previous_state_whole(
    settings: Settings, knowledge: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_service(settings) as kb:
        before = await kb.info()
        for name in ("a", "b", "c"):
            write_doc(knowledge, f"practices/{name}.md", f"# Doc {name}\n\ntext\n")
        write_doc(knowledge, "core/honesty.md", "# Honesty rewritten\n\nnew\n")

        async def failing_insert(*args: object, **kwargs: object) -> None:
            # By now the changed core/honesty.md has been written as a new revision in this transaction.
            raise OSError("disk full")

        monkeypatch.setattr(SqliteWriter, "insert_many", failing_insert)
        with pytest.raises(OSError, match="disk full"):
            await kb.import_paths([knowledge])
        after = await kb.info()
        assert (after.documents, after.generation) == (before.documents, before.generation)
        assert (await kb.get("honesty")).title == "Honesty About Verification"
        await assert_index_consistent(kb)


async def test_missing_path_is_reported(service: KnowledgeService, tmp_path: Path) -> None:
    report = await service.import_paths([tmp_path / "nope"])
    assert [s.reason for s in report.skipped] == ["no such file or folder"]


async def test_single_file_and_derived_ids(service: KnowledgeService, tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    path = write_doc(notes, "Team Notes/Deploy Checklist.md", "Steps before a deploy.\n")
    report = await service.import_paths([notes])
    assert report.created == 1
    created = await service.get("Team-Notes.Deploy-Checklist")
    assert (created.layer, created.title) == ("practices", "Deploy Checklist")
    path.write_text("Steps before a deploy, revised.\n")
    assert (await service.import_paths([path])).updated == 1


# Real-world shapes: the names that collided under the old id scheme, and a few more.
REAL_WORLD = [
    "core/INDEX.md",
    "guidelines/INDEX.md",
    "frameworks/INDEX.md",
    "frameworks/autonomy/LEVELS.md",
    "frameworks/autonomy/README.md",
    "practices/README.md",
    "practices/readme.md",
    "practices/clang.md",
    "practices/clang++.md",
    "practices/qm-move_disk.md",
    "practices/qm-move-disk.md",
    "practices/Deploy Checklist.md",
    "practices/Deploy-Checklist.md",
    "practices/$.md",
    "practices/[.md",
    "notes.md",
    "notes.markdown",
]


async def test_every_distinct_file_gets_its_own_id(tmp_path: Path) -> None:
    folder = tmp_path / "real"
    for number, relative in enumerate(REAL_WORLD):
        write_doc(folder, relative, f"# Page {number}\n\nUnique marker word{number}x.\n")
    async with open_service(make_settings(tmp_path, knowledge_dirs=[folder])) as kb:
        report = kb.last_import
        assert report is not None and (report.created, report.skipped) == (len(REAL_WORLD), [])
        listed = await kb.list(limit=100)
        assert listed.total == len(REAL_WORLD)
        for number, relative in enumerate(REAL_WORLD):
            hits = (await kb.search(f"word{number}x")).hits
            assert len(hits) == 1
            doc = await kb.get(hits[0].id)
            assert doc.source_path == str(folder / relative)
        ids = {item.id for item in listed.items}
        assert {"core.INDEX", "guidelines.INDEX", "frameworks.autonomy.LEVELS", "practices.clang"} <= ids

        again = await kb.import_paths([folder])
        assert (again.unchanged, again.created, again.updated, again.removed) == (len(REAL_WORLD), 0, 0, 0)
        assert {item.id for item in (await kb.list(limit=100)).items} == ids


async def test_a_stored_id_never_changes(service: KnowledgeService, knowledge: Path) -> None:
    # A database written by an older SAGE holds ids of the old scheme ('plain-note'); the file keeps its id.
    async with sqlite_db(service).transaction() as conn:
        await conn.execute("UPDATE documents SET id = 'plain-note' WHERE id = 'scenarios.plain-note'")
    write_doc(knowledge, "scenarios/plain-note.md", "# Production Incident Notes\n\nRevised.\n")
    report = await service.import_paths([knowledge])
    assert (report.updated, report.created) == (1, 0)
    assert (await service.get("plain-note")).body == "# Production Incident Notes\n\nRevised.\n"


async def test_a_users_document_never_loses_to_a_bundled_one(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    write_doc(mine, "frameworks/autonomy/LEVELS.md", "# Our Autonomy Levels\n\nLevel zero: ask first.\n")
    shadow = write_doc(mine, "api.md", "---\nid: api-design\n---\n# Our API Rules\n\nAlways version paths.\n")
    settings = make_settings(tmp_path, knowledge_dirs=[mine], bundled_knowledge=True)
    async with open_service(settings) as kb:
        report = kb.last_import
        assert report is not None and report.skipped == []
        assert [(s.id, s.by) for s in report.shadowed] == [("api-design", str(shadow))]
        assert (await kb.get("frameworks.autonomy.LEVELS")).title == "Our Autonomy Levels"
        assert (await kb.get("autonomy-levels")).source_path != str(mine / "frameworks/autonomy/LEVELS.md")
        assert (await kb.get("api-design")).title == "Our API Rules"

        shadow.unlink()  # the user's document goes: the bundled one comes back
        await kb.import_configured()
        assert (await kb.get("api-design")).title != "Our API Rules"
        assert (await kb.history("api-design")).revisions[0].change == "update"


async def test_pipes_sockets_and_devices_are_skipped_without_reading(tmp_path: Path, knowledge: Path) -> None:
    os.mkfifo(knowledge / "practices" / "pipe.md")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(knowledge / "practices" / "socket.md"))
        os.symlink("/dev/zero", knowledge / "practices" / "zero.md")
        with anyio.fail_after(30):  # reading the FIFO would wait for a writer forever
            async with open_service(make_settings(tmp_path, knowledge_dirs=[knowledge])) as kb:
                report = kb.last_import
    assert report is not None and report.created == 4
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert reasons == {
        "pipe.md": "a named pipe (FIFO), not a regular file; skipped without reading it",
        "socket.md": "a socket, not a regular file; skipped without reading it",
        "zero.md": "symlink points outside the imported folder; not followed",
    }


async def test_a_device_inside_the_folder_is_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "kb"
    write_doc(folder, "practices/ok.md", "# Fine\n\ntext\n")
    os.symlink("/dev/null", folder / "practices" / "null.md")
    report = collect([folder], make_settings(tmp_path))
    assert [f.doc.id for f in report.files] == ["practices.ok"]
    # The link leaves the folder, which is reason enough; the kind of file is checked for links that stay inside.
    assert len(report.skipped) == 1


CONTROL_FILES = {
    "practices/escape-title.md": ('---\ntitle: "Bad \\e[31m title"\n---\n# x\n\ntext\n', "field title"),
    "practices/bell-tag.md": ('---\ntags: ["ok", "a\\abell"]\n---\n# x\n\ntext\n', "field tags"),
    "practices/escape-body.md": ("# Title\n\nred \x1b[31m text\n", "field body"),
}


async def test_control_characters_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "kb"
    for relative, (text, _) in CONTROL_FILES.items():
        write_doc(folder, relative, text)
    write_doc(folder, "practices/fine.md", "# Fine\r\n\r\n\tindented\r\nline two\r\n")
    async with open_service(make_settings(tmp_path, knowledge_dirs=[folder])) as kb:
        report = kb.last_import
        assert report is not None and report.created == 1
        reasons = {Path(s.path).name: s.reason for s in report.skipped}
        for relative, (_, field) in CONTROL_FILES.items():
            reason = reasons[Path(relative).name]
            assert reason.startswith(field) and "control character U+" in reason, reason
        assert (await kb.get("practices.fine")).body == "# Fine\n\n\tindented\nline two\n"


async def test_links_aliases_and_translations_from_frontmatter(tmp_path: Path) -> None:
    folder = tmp_path / "kb"
    write_doc(
        folder,
        "templates/postmortem.md",
        "---\nid: incident-postmortem\ntitle: Incident Postmortem Template\nrelated: [production-incident]\n"
        "aliases: [postmortem-template, old-postmortem]\ntitle_zh: 事故复盘模板\nsummary_zh: 写事后复盘的结构\n---\n"
        "# Incident Postmortem Template\n\nTimeline, impact, causes, actions.\n",
    )
    async with open_service(make_settings(tmp_path, knowledge_dirs=[folder])) as kb:
        doc = await kb.get("incident-postmortem")
        assert doc.related == ["production-incident"]
        assert doc.aliases == ["postmortem-template", "old-postmortem"]
        assert doc.translations["zh"].title == "事故复盘模板"
        assert (await kb.get("old-postmortem")).id == "incident-postmortem"
        assert (await kb.history("postmortem-template")).id == "incident-postmortem"
        assert [h.id for h in (await kb.search("事后复盘")).hits] == ["incident-postmortem"]
        assert [h.id for h in (await kb.search("复盘模板")).hits] == ["incident-postmortem"]
        await assert_index_consistent(kb)


async def test_a_later_explicit_id_takes_the_id_of_a_file_written_before_it(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    write_doc(folder, "practices/a-note.md", "# A note\n\nFirst marker alphaword.\n")
    write_doc(folder, "practices/b-note.md", "# B note\n\nSecond marker betaword.\n")
    write_doc(folder, "practices/z.md", "---\nid: practices.a-note\n---\n# Z\n\nThird marker zetaword.\n")
    async with open_service(make_settings(tmp_path, knowledge_dirs=[folder])) as kb:
        report = kb.last_import
        assert report is not None and (report.created, report.skipped) == (3, [])
        assert (await kb.get("practices.a-note")).title == "Z"  # an explicit id wins over a derived one
        hashed = (await kb.search("alphaword")).hits[0].id
        assert hashed.startswith("practices.a-note") and hashed != "practices.a-note"
        assert [h.id for h in (await kb.search("betaword")).hits] == ["practices.b-note"]
        assert (await kb.info()).documents == 3
        await assert_index_consistent(kb)


def test_files_handed_over_are_kept_light(tmp_path: Path, settings: Settings, knowledge: Path) -> None:
    handed: list[ingest.ParsedFile] = []
    collected = collect([knowledge], settings, handed=handed.extend)
    assert [p.path for p in handed] == [p.path for p in collected.files] and len(handed) == 4
    assert all(p.doc.body.strip() and not p.light for p in handed)  # the import writes these
    # The reader keeps only what the plan reads: the path, hash, stat, id and aliases.
    assert any(p.doc.tags for p in handed)
    assert all(p.light and (p.doc.body, p.doc.tags, p.doc.summary) == ("", [], "") for p in collected.files)
    assert [(p.doc.id, p.doc.aliases, p.source_hash) for p in collected.files] == [
        (p.doc.id, p.doc.aliases, p.source_hash) for p in handed
    ]
    whole = ingest.read_again(collected.files[0], settings)
    assert whole.doc == handed[0].doc and not whole.light
    Path(whole.path).write_text(Path(whole.path).read_text() + "\nChanged.\n")
    with pytest.raises(ingest.SkipFile, match="changed while it was imported"):
        ingest.read_again(collected.files[0], settings)


async def test_a_file_changed_before_it_is_read_again_is_skipped_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a-note is written early, then z takes its id: the plan creates it under another id, which needs its body
    # again, and by then the file has changed. It is left out and reported; the rest imports.
    folder = tmp_path / "notes"
    a_note = write_doc(folder, "practices/a-note.md", "# A note\n\nFirst marker alphaword.\n")
    write_doc(folder, "practices/z.md", "---\nid: practices.a-note\n---\n# Z\n\nThird marker zetaword.\n")
    read = ingest.collect

    def then_changed(*args: object, **kwargs: object) -> ingest.Collected:
        collected = read(*args, **kwargs)  # type: ignore[arg-type]
        a_note.write_text("# A note\n\nRewritten meanwhile.\n")
        return collected

    monkeypatch.setattr(ingest, "collect", then_changed)
    async with open_service(make_settings(tmp_path)) as kb:
        report = await kb.import_paths([folder])
        assert report.created == 1  # z; a-note is not counted as created
        assert [(Path(s.path).name, s.reason) for s in report.skipped] == [
            ("a-note.md", "the file changed while it was imported; the next import reads it")
        ]
        assert (await kb.get("practices.a-note")).title == "Z"
        assert (await kb.info()).documents == 1
        assert (await kb.search("alphaword")).hits == []
        await assert_index_consistent(kb)
        monkeypatch.setattr(ingest, "collect", read)
        report = await kb.import_paths([folder])  # the next import reads it as it is now
        assert report.created == 1 and [h.title for h in (await kb.search("rewritten meanwhile")).hits] == ["A note"]
