"""The id scheme: every distinct file gets its own readable id, the same every time."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from sage_server.ids import document_id, path_parts, title_id
from sage_server.models import check_id

# The README's table of examples.
EXAMPLES = {
    "core/INDEX.md": "core.INDEX",
    "guidelines/INDEX.md": "guidelines.INDEX",
    "frameworks/autonomy/LEVELS.md": "frameworks.autonomy.LEVELS",
    "practices/clang.md": "practices.clang",
    "practices/clang++.md": "practices.clang-63b6e8",
    "notes/qm-move_disk.md": "notes.qm-move_disk",
    "notes/qm-move-disk.md": "notes.qm-move-disk",
    "Team Notes/Deploy Checklist.md": "Team-Notes.Deploy-Checklist",
    "README.md": "README",
    "readme.md": "readme",
    "$.md": "09fc96",
    "[.md": "245843",
    "man1/ls.1.md": "man1.ls-1-4de4ca",
    "x.markdown": "x-markdown-5abe4a",
    "事故复盘.md": "事故复盘",
}


def file_id(relative: str, layer_folder: str | None = None) -> str:
    return document_id(path_parts(PurePosixPath(relative), layer_folder))


@pytest.mark.parametrize(("relative", "expected"), EXAMPLES.items())
def test_readme_examples(relative: str, expected: str) -> None:
    assert file_id(relative) == expected
    assert check_id(expected) == expected


def test_distinct_files_get_distinct_valid_ids() -> None:
    names = [
        *EXAMPLES,
        "a/b.md",
        "a.b.md",
        "a b.md",
        "a  b.md",
        "x.md",
        "X.md",
        "x.MD",
        "notes/$$.md",
        "notes/[.md",
        "notes/].md",
        "c#.md",
        "c.md",
        "f#.md",
        "_drafts/a.md",
        "Café.md",
        "Cafe\u0301.md",  # the same word, decomposed (as macOS names files)
        "a" * 300 + ".md",
        "a" * 301 + ".md",
    ]
    ids = [file_id(name) for name in names]
    assert all(check_id(i) for i in ids)
    # Space-only differences ('a b' / 'a  b') map to one readable id on purpose; the import gives the later file the
    # hashed form (tested in test_reconcile). Every other distinct name gets a distinct id from the scheme alone.
    hashed = [document_id(path_parts(PurePosixPath(name)), hashed=True) for name in names]
    assert len(set(hashed)) == len(names)
    assert len(set(ids)) == len(names) - 1


def test_a_layer_folder_as_the_imported_folder_gives_the_same_ids() -> None:
    assert file_id("x.md", layer_folder="practices") == file_id("practices/x.md") == "practices.x"


def test_ids_are_stable_and_short() -> None:
    assert file_id("notes/qm-move disk!.md") == file_id("notes/qm-move disk!.md")
    assert len(file_id("a" * 300 + ".md")) <= 128
    assert len(file_id("/".join(["folder"] * 40) + "/x.md")) <= 128


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("Rate Limits: Token Buckets", "rate-limits-token-buckets"),
        ("Retries - a primer", "retries-a-primer"),
        ("事故复盘模板", "事故复盘模板"),
        ("  Deploy   Checklist ", "deploy-checklist"),
    ],
)
def test_title_ids(title: str, expected: str) -> None:
    assert title_id(title) == expected
    assert check_id(title_id(title))


def test_a_title_with_no_letters_still_gets_a_valid_id() -> None:
    assert check_id(title_id("!!!"))
