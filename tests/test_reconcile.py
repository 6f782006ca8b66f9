"""Import reconciliation, without a database: who gets which id, what is created, updated, kept and removed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import PurePosixPath

from sage_server.ids import document_id, path_parts
from sage_server.ingest import ParsedFile
from sage_server.models import DocumentIn
from sage_server.reconcile import ImportPlan, Stored, plan_import, skippable, unsure

ROOT = "/kb"
BUNDLED = "/site/knowledge"


def parsed(relative: str, doc_id: str | None = None, *, content: str = "v1", root: str = ROOT) -> ParsedFile:
    """A file as collect() would read it: an explicit id, or one derived from its path."""
    parts = None if doc_id else tuple(path_parts(PurePosixPath(relative)))
    return ParsedFile(
        path=f"{root}/{relative}",
        doc=DocumentIn(id=doc_id or document_id(parts or ()), title="T", layer="practices", body=content),
        source_hash=f"hash-{content}",
        id_parts=parts,
        bundled=root == BUNDLED,
    )


def stored(doc_id: str, path: str | None, *, content: str = "v1", deleted: bool = False) -> Stored:
    return Stored(
        id=doc_id,
        source_path=path,
        source_hash=f"hash-{content}" if path else None,
        deleted=deleted,
        removed_by_import=False,
        bundled=bool(path and path.startswith(BUNDLED)),
    )


def plan(
    files: list[ParsedFile],
    known: list[Stored] | None = None,
    exists: set[str] | None = None,
    folders: tuple[str, ...] = (ROOT, BUNDLED),
) -> ImportPlan:
    """Plan an import of `files` from `folders`; a path exists on disk when it is one of the files or in `exists`."""
    on_disk = {f.path for f in files} | (exists or set())
    return plan_import(files, known or [], folders, {f.path for f in files}, lambda path: path in on_disk)


def ids(files: list[ParsedFile]) -> list[str]:
    return sorted(f.doc.id for f in files)


def test_new_files_are_created_with_their_own_ids() -> None:
    result = plan([parsed("core/INDEX.md"), parsed("guidelines/INDEX.md"), parsed("notes/a.md", "explicit")])
    assert ids(result.create) == ["core.INDEX", "explicit", "guidelines.INDEX"]
    assert (result.update, result.remove, result.skipped, result.shadowed) == ([], [], [], [])


def test_a_derived_id_taken_by_an_explicit_one_gets_its_hashed_form() -> None:
    derived = parsed("notes/guide.md")
    explicit = parsed("other/x.md", "notes.guide")
    result = plan([derived, explicit])
    assert ids(result.create) == sorted(["notes.guide", document_id(("notes", "guide"), hashed=True)])
    assert next(f for f in result.create if f.path == explicit.path).doc.id == "notes.guide"


def test_names_differing_only_by_spaces_and_dashes_both_import() -> None:
    result = plan([parsed("a b.md"), parsed("a-b.md")])
    assert len(result.create) == 2 and len(set(ids(result.create))) == 2
    assert result.skipped == []


def test_two_explicit_ids_are_the_only_duplicate_error() -> None:
    result = plan([parsed("one.md", "same"), parsed("two.md", "same")])
    assert ids(result.create) == ["same"]
    assert [s.path for s in result.skipped] == [f"{ROOT}/two.md"]
    assert "duplicate id 'same': already used by /kb/one.md" in result.skipped[0].reason


def test_a_users_document_wins_over_a_bundled_one() -> None:
    bundled = parsed("practices/api-design.md", "api-design", root=BUNDLED)
    users = parsed("mine/api.md", "api-design", content="mine")
    result = plan([bundled, users])
    assert [f.path for f in result.create] == [users.path]
    assert [(s.path, s.id, s.by) for s in result.shadowed] == [(bundled.path, "api-design", users.path)]
    assert result.skipped == []


def test_a_users_file_takes_over_a_stored_bundled_document() -> None:
    bundled = parsed("practices/api-design.md", "api-design", root=BUNDLED)
    users = parsed("mine/api.md", "api-design", content="mine")
    result = plan([bundled, users], [stored("api-design", bundled.path)])
    assert [f.path for f in result.update] == [users.path]
    assert len(result.shadowed) == 1 and result.create == [] and result.remove == []


def test_a_bundled_document_stays_away_while_the_users_is_stored() -> None:
    bundled = parsed("practices/api-design.md", "api-design", root=BUNDLED)
    result = plan([bundled], [stored("api-design", "/kb/mine/api.md", content="mine")], exists={"/kb/mine/api.md"})
    assert (result.create, result.update, result.unchanged) == ([], [], 0)
    assert [s.by for s in result.shadowed] == ["/kb/mine/api.md"]


def test_an_api_document_keeps_its_id() -> None:
    explicit = parsed("notes/x.md", "saved")
    derived = parsed("saved.md")
    result = plan([explicit, derived], [stored("saved", None)])
    assert "a document saved through the API" in result.skipped[0].reason
    assert ids(result.create) == [document_id(("saved",), hashed=True)]


def test_a_known_file_keeps_its_stored_id() -> None:
    legacy = stored("deploy-checklist", "/kb/notes/Deploy Checklist.md")
    result = plan([parsed("notes/Deploy Checklist.md")], [legacy])
    assert result.unchanged == 1 and result.create == [] and result.remove == []


def test_changed_unchanged_and_gone() -> None:
    files = [parsed("a.md", content="v2"), parsed("b.md")]
    known = [stored("a", "/kb/a.md"), stored("b", "/kb/b.md"), stored("c", "/kb/c.md"), stored("api", None)]
    result = plan(files, known)
    assert ids(result.update) == ["a"]
    assert result.unchanged == 1
    assert [r.id for r in result.remove] == ["c"]  # the API document is not the import's to remove


def test_a_file_outside_the_imported_folders_is_not_removed() -> None:
    result = plan([parsed("a.md")], [stored("elsewhere", "/other/x.md")], folders=(ROOT,))
    assert result.remove == []


def test_a_moved_file_with_an_explicit_id_keeps_its_history() -> None:
    result = plan([parsed("new/place.md", "guide")], [stored("guide", "/kb/old/place.md")])
    assert [f.path for f in result.update] == ["/kb/new/place.md"]
    assert result.remove == [] and result.skipped == []


def test_a_file_that_changes_its_explicit_id_removes_the_old_one() -> None:
    result = plan([parsed("a.md", "new-id")], [stored("old-id", "/kb/a.md")])
    assert ids(result.create) == ["new-id"]
    assert [r.id for r in result.remove] == ["old-id"]


def test_a_file_removed_by_an_import_comes_back() -> None:
    gone = Stored("a", "/kb/a.md", "hash-v1", deleted=True, removed_by_import=True)
    assert ids(plan([parsed("a.md")], [gone]).update) == ["a"]
    deleted_by_a_person = Stored("a", "/kb/a.md", "hash-v1", deleted=True, removed_by_import=False)
    assert plan([parsed("a.md")], [deleted_by_a_person]).unchanged == 1


def test_only_the_one_document_of_a_file_with_a_stat_may_pass_unread() -> None:
    known = [
        Stored("a", "/kb/a.md", "h", deleted=False, removed_by_import=False, source_stat="s-a"),
        Stored("b", "/kb/b.md", "h", deleted=False, removed_by_import=False),  # no stat: changed moments before
        Stored("c", "/kb/c.md", "h", deleted=True, removed_by_import=True, source_stat="s-c"),  # reading brings it back
        Stored("d-old", "/kb/d.md", "h", deleted=True, removed_by_import=False, source_stat="s-d"),
        Stored("d", "/kb/d.md", "h", deleted=False, removed_by_import=False, source_stat="s-d"),  # two for one file
        Stored("api", None, None, deleted=False, removed_by_import=False),
    ]
    assert skippable(known) == {"/kb/a.md": "s-a"}


def test_unread_files_are_read_when_the_store_moved_or_a_read_file_wants_their_id() -> None:
    known = [
        Stored("a", "/kb/a.md", "h", deleted=False, removed_by_import=False, source_stat="s-a"),
        Stored("b", "/kb/b.md", "h", deleted=False, removed_by_import=False, source_stat="s-b2"),
        Stored("c", "/kb/c.md", "h", deleted=False, removed_by_import=False, source_stat="s-c"),
    ]
    unread = {"/kb/a.md": "s-a", "/kb/b.md": "s-b", "/kb/c.md": "s-c", "/kb/gone-from-store.md": "s-x"}
    assert unsure([], unread, known) == {"/kb/b.md", "/kb/gone-from-store.md"}
    assert unsure([parsed("new.md", "c")], unread, known) == {"/kb/b.md", "/kb/c.md", "/kb/gone-from-store.md"}


def test_unread_files_count_as_unchanged_and_a_new_stat_is_kept() -> None:
    result = plan_import(
        [replace(parsed("a.md"), stat="s-new")],
        [stored("a", "/kb/a.md"), stored("b", "/kb/b.md")],
        [ROOT],
        {"/kb/a.md", "/kb/b.md"},
        lambda path: True,
        unread={"/kb/b.md"},
    )
    assert (result.unchanged, result.create, result.update, result.remove) == (2, [], [], [])
    assert result.restat == [("a", "s-new")]
