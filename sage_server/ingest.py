"""Reading Markdown folders into documents: frontmatter, ids, layers, and clear reasons for bad files."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sage_server.config import Settings
from sage_server.ids import document_id, path_parts
from sage_server.markdown import FrontmatterError, first_heading, split_frontmatter
from sage_server.models import DocumentIn, SkippedFile, Translation
from sage_server.resources import knowledge_dir

MARKDOWN_SUFFIXES = {".md", ".markdown"}
# Frontmatter `title_zh: ...` / `summary_pt-BR: ...`: a document's title and summary in another language.
_TRANSLATED = re.compile(r"^(title|summary)_([a-z]{2,3}(?:-[A-Za-z0-9]{2,8})?)$")
_FILE_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


class SkipFile(Exception):
    """A file that cannot be imported; the message is the reason shown to the user."""


@dataclass(frozen=True)
class ParsedFile:
    """A file turned into a document, with the hash of its bytes for incremental re-import.

    `id_parts` are the name parts its id was derived from (see ids.py), or None when the frontmatter gave the id.
    `bundled` marks the knowledge that ships with SAGE, which gives way to a user's document with the same id.
    """

    path: str
    doc: DocumentIn
    source_hash: str
    id_parts: tuple[str, ...] | None = None
    bundled: bool = False


@dataclass
class Collected:
    """Everything one import run read: documents, skipped files, and the folders it covered."""

    files: list[ParsedFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    folders: list[str] = field(default_factory=list)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def scan(root: Path) -> Iterator[tuple[Path, str | None]]:
    """Yield (file, problem) for every Markdown file under `root`; hidden folders and files are passed over.

    Folder symlinks are never followed; a file symlink is reported when its target leaves `root`.
    """
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or path.suffix.lower() not in MARKDOWN_SUFFIXES:
                continue
            if path.is_symlink() and not _inside(path.resolve(), root):
                yield path, "symlink points outside the imported folder; not followed"
            else:
                yield path, _not_regular(path)


def _not_regular(path: Path) -> str | None:
    """Why `path` cannot be read as a file, found without opening it (reading a FIFO would wait forever)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot read file: {exc.strerror}"
    if stat.S_ISREG(mode):
        return None
    kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return f"{kind}, not a regular file; skipped without reading it"


def _string_list(meta: dict[str, Any], key: str) -> list[str]:
    value = meta.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise SkipFile(f"frontmatter field {key!r} must be a list of strings")


def _string(meta: dict[str, Any], key: str) -> str | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, str | int | float):
        return str(value).strip()
    raise SkipFile(f"frontmatter field {key!r} must be a string")


def _first_paragraph(body: str, limit: int = 240) -> str:
    for block in re.split(r"\n\s*\n", body):
        text = " ".join(block.split())
        if text and not text.startswith(("#", "```", "|", "-", "*", ">")):
            return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"
    return ""


def _translations(meta: dict[str, Any]) -> dict[str, Translation]:
    found: dict[str, dict[str, str]] = {}
    for key in meta:
        match = _TRANSLATED.match(key)
        if match:
            found.setdefault(match.group(2), {})[match.group(1)] = _string(meta, key) or ""
    return {language: Translation(**fields) for language, fields in found.items()}


def _invalid(exc: ValidationError) -> SkipFile:
    first = exc.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    return SkipFile(f"field {'.'.join(str(p) for p in first['loc'])}: {message}")


def parse_file(path: Path, root: Path, settings: Settings, *, bundled: bool = False) -> ParsedFile:
    """Read one Markdown file into a document, or raise SkipFile with the reason. `bundled` marks a file of the
    knowledge that ships with SAGE."""
    try:
        size = path.stat().st_size
        if size > settings.max_file_bytes:
            raise SkipFile(f"file is {size} bytes, over the {settings.max_file_bytes}-byte limit (max_file_bytes)")
        raw = path.read_bytes()
    except OSError as exc:
        raise SkipFile(f"cannot read file: {exc.strerror}") from exc
    if b"\x00" in raw:
        raise SkipFile("binary file (contains NUL bytes), not Markdown")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SkipFile(f"not UTF-8 text (bad byte at offset {exc.start})") from exc
    if not text.strip():
        raise SkipFile("empty file")
    try:
        meta, body = split_frontmatter(text)
    except FrontmatterError as exc:
        raise SkipFile(str(exc)) from exc
    if not body.strip():
        raise SkipFile("no Markdown content after the frontmatter")

    relative = path.relative_to(root)
    in_layer_folder = len(relative.parts) > 1 and relative.parts[0] in settings.layers
    root_layer = root.name if root.name in settings.layers and not in_layer_folder else None
    folder_layer = relative.parts[0] if in_layer_folder else root_layer
    layer = _string(meta, "layer") or folder_layer or settings.default_layer
    if layer not in settings.layers:
        raise SkipFile(f"unknown layer {layer!r} (known: {', '.join(settings.layers)})")
    explicit_id = _string(meta, "id")
    parts = None if explicit_id else tuple(path_parts(relative, root_layer))
    title = _string(meta, "title") or first_heading(body) or path.stem.replace("-", " ").replace("_", " ").title()
    try:
        doc = DocumentIn(
            id=explicit_id or document_id(parts or ()),
            title=title,
            layer=layer,
            body=body.strip() + "\n",
            tags=[t.lower() for t in _string_list(meta, "tags")],
            triggers=_string_list(meta, "triggers"),
            summary=_string(meta, "summary") or _first_paragraph(body),
            related=_string_list(meta, "related"),
            aliases=_string_list(meta, "aliases"),
            translations=_translations(meta),
        )
    except ValidationError as exc:
        raise _invalid(exc) from exc
    return ParsedFile(
        path=str(path),
        doc=doc,
        source_hash=hashlib.sha256(raw).hexdigest(),
        id_parts=parts,
        bundled=bundled,
    )


def collect(paths: list[Path], settings: Settings) -> Collected:
    """Read every Markdown file under `paths` (folders or single files). Which file gets which id, when several
    claim one, is decided with the stored documents in view (see reconcile.py)."""
    result = Collected()
    bundled_root = knowledge_dir().resolve()
    for given in paths:
        root = given.expanduser().resolve()
        bundled = _inside(root, bundled_root)
        if root.is_dir():
            result.folders.append(str(root))
            entries: Iterator[tuple[Path, str | None]] = scan(root)
        elif root.is_file():
            entries, root = iter([(root, None)]), root.parent
        else:
            result.skipped.append(SkippedFile(path=str(given), reason="no such file or folder"))
            continue
        for path, problem in entries:
            result.seen.add(str(path))
            try:
                if problem:
                    raise SkipFile(problem)
                result.files.append(parse_file(path, root, settings, bundled=bundled))
            except SkipFile as exc:
                result.skipped.append(SkippedFile(path=str(path), reason=str(exc)))
    return result
