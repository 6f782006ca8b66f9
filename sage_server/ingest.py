"""Reading Markdown folders into documents: frontmatter, ids, layers, and clear reasons for bad files."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sage_server.config import Settings
from sage_server.ids import document_id, path_parts
from sage_server.markdown import FrontmatterError, first_heading, split_frontmatter
from sage_server.models import DocumentIn, SkippedFile, Translation
from sage_server.resources import knowledge_dir

MARKDOWN_SUFFIXES = {".md", ".markdown"}
_SUFFIXES = tuple(MARKDOWN_SUFFIXES)  # for str.endswith
# Frontmatter `title_zh: ...` / `summary_pt-BR: ...`: a document's title and summary in another language.
_TRANSLATED = re.compile(r"^(title|summary)_([a-z]{2,3}(?:-[A-Za-z0-9]{2,8})?)$")
_FILE_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


# A file changed less than this long before it was looked at is read again next time whatever its times say: a
# rewrite within the same timestamp tick (coarse on some file systems) with the same size would otherwise look
# unchanged ("racy" timestamps, as git calls them).
RACY_NS = 2_000_000_000


# Files read are handed to the import this many at a time (collect's `handed`): enough for one bulk insert to pay
# off, few enough that writing starts early.
HAND_OVER = 500


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
    stat: str | None = None  # file_stat of the file as it was read
    root: str = ""  # the folder it was imported from, which its layer and id are read against
    # Its document was dropped once it was handed to the import to write (see collect): what the plan needs (the
    # id and aliases) is kept, and the file is read again in the rare case the plan writes it after all.
    light: bool = False

    def without_body(self) -> ParsedFile:
        """This file light: its document reduced to what reconcile.plan_import reads, the id and aliases (an empty
        body: never written, see importing._whole)."""
        doc = _light_document().model_copy(update={"id": self.doc.id, "aliases": self.doc.aliases})
        return dataclasses.replace(self, doc=doc, light=True)


@lru_cache(maxsize=1)
def _light_document() -> DocumentIn:
    # Copied for each light file: a copy shares the empty values (model_construct inspects its defaults per call).
    return DocumentIn(id="light", title="light", layer="light", body="light").model_copy(update={"body": ""})


@dataclass(frozen=True, slots=True)
class Unread:
    """A file passed over unread because its file_stat is the one stored when it was last read. `after`: how many
    read files came before it, so reading it later (read_unread) puts it back in scan order."""

    path: str
    root: Path
    bundled: bool
    stat: str
    after: int


@dataclass
class Collected:
    """Everything one import run read: documents, skipped files, files passed over unread (by path), and the
    folders it covered."""

    files: list[ParsedFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    folders: list[str] = field(default_factory=list)
    unread: dict[str, Unread] = field(default_factory=dict)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def scan(root: Path) -> Iterator[tuple[str, str | None, os.stat_result | None]]:
    """Yield (file, problem, its stat) for every Markdown file under `root`, in os.walk's top-down order (a folder's
    files by name, then its subfolders by name); hidden folders and files are passed over, and so are folders that
    cannot be listed. Folder symlinks are never followed; a file symlink is reported when its target leaves `root`.
    One stat call per file and no Path objects: a re-scan of unchanged files is mostly this loop, so it works on
    os.scandir's entries (their type comes with the listing) rather than os.walk's names and an os.lstat each."""
    folders = [str(root)]
    while folders:
        try:
            with os.scandir(folders.pop()) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_folder = entry.is_dir()  # as in os.walk, a symlink to a folder is one: never read, never followed
            except OSError:
                is_folder = False
            if is_folder:
                if not entry.is_symlink():
                    subfolders.append(entry.path)
                continue
            if not name.lower().endswith(_SUFFIXES):
                continue
            path = entry.path
            try:
                found = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(found.st_mode):
                    if not _inside(Path(path).resolve(), root):
                        yield path, "symlink points outside the imported folder; not followed", None
                        continue
                    found = os.stat(path)
            except OSError as exc:
                yield path, f"cannot read file: {exc.strerror}", None
                continue
            yield path, _not_regular(found.st_mode), found
        folders += reversed(subfolders)  # the last pushed is listed next: subfolders go in name order


def _not_regular(mode: int) -> str | None:
    """Why a file of this mode cannot be read as a file (told without opening it: reading a FIFO would wait
    forever)."""
    if stat.S_ISREG(mode):
        return None
    kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return f"{kind}, not a regular file; skipped without reading it"


def _settings_fingerprint(settings: Settings) -> str:
    """The settings that decide whether and how a file is read: a file read under others is read again."""
    return _fingerprint(tuple(settings.layers), settings.default_layer, settings.max_file_bytes)


@lru_cache(maxsize=8)
def _fingerprint(*deciding: object) -> str:
    return hashlib.sha256(repr(deciding).encode()).hexdigest()[:8]


def file_stat(found: os.stat_result, settings: Settings) -> str | None:
    """What an import remembers of a file to pass over it unread next time: size, modification and change times
    (ns), inode, device and the settings' fingerprint. None when the file changed too recently to trust its times
    (RACY_NS): it is read again next time. A file replaced by another (a rename over it, a copy from elsewhere, the
    same path on another machine) has another inode or device, so it is read."""
    return _file_stat(found, _settings_fingerprint(settings))


def _file_stat(found: os.stat_result, fingerprint: str) -> str | None:
    """file_stat with the settings' fingerprint at hand (collect works it out once, not once per file)."""
    recent = time.time_ns() - RACY_NS
    if found.st_mtime_ns > recent or found.st_ctime_ns > recent:
        return None
    return f"{found.st_size}:{found.st_mtime_ns}:{found.st_ctime_ns}:{found.st_ino}:{found.st_dev}:{fingerprint}"


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


def parse_file(
    path: Path, root: Path, settings: Settings, *, bundled: bool = False, found: os.stat_result | None = None
) -> ParsedFile:
    """Read one Markdown file into a document, or raise SkipFile with the reason. `bundled` marks a file of the
    knowledge that ships with SAGE; `found` is its stat when the caller has it."""
    try:
        if found is None:
            found = path.stat()  # before reading: a change after it makes the next import read the file again
        if found.st_size > settings.max_file_bytes:
            raise SkipFile(
                f"file is {found.st_size} bytes, over the {settings.max_file_bytes}-byte limit (max_file_bytes)"
            )
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
        stat=file_stat(found, settings),
        root=str(root),
    )


def collect(
    paths: list[Path],
    settings: Settings,
    known: Mapping[str, str] | None = None,
    handed: Callable[[list[ParsedFile]], None] | None = None,
) -> Collected:
    """Read every Markdown file under `paths` (folders or single files). Which file gets which id, when several
    claim one, is decided with the stored documents in view (see reconcile.py). A file in a folder whose file_stat
    is its `known` one (path -> stat) is not read: it goes to `unread`. `handed`, when given, gets the files read
    in chunks of HAND_OVER as they come (the import starts writing them while the rest are read), and the files
    kept are then light (ParsedFile.without_body): an import of 100k files held its whole corpus (1.1 GB) until
    the last was read."""
    known = known or {}
    fingerprint = _settings_fingerprint(settings)
    result = Collected()
    given_out = 0
    bundled_root = knowledge_dir().resolve()
    for given in paths:
        root = given.expanduser().resolve()
        bundled = _inside(root, bundled_root)
        if root.is_dir():
            result.folders.append(str(root))
            entries: Iterator[tuple[str, str | None, os.stat_result | None]] = scan(root)
        elif root.is_file():
            entries, root = iter([(str(root), None, None)]), root.parent
        else:
            result.skipped.append(SkippedFile(path=str(given), reason="no such file or folder"))
            continue
        for name, problem, found in entries:
            result.seen.add(name)
            remembered = known.get(name)
            if remembered is not None and found is not None and remembered == _file_stat(found, fingerprint):
                result.unread[name] = Unread(name, root, bundled, remembered, len(result.files))
                continue
            try:
                if problem:
                    raise SkipFile(problem)
                result.files.append(parse_file(Path(name), root, settings, bundled=bundled, found=found))
            except SkipFile as exc:
                result.skipped.append(SkippedFile(path=name, reason=str(exc)))
            if handed is not None and len(result.files) - given_out >= HAND_OVER:
                given_out = _hand_over(result.files, given_out, handed)
    if handed is not None and len(result.files) > given_out:
        _hand_over(result.files, given_out, handed)
    return result


def _hand_over(files: list[ParsedFile], given_out: int, handed: Callable[[list[ParsedFile]], None]) -> int:
    """Hand the files read since `given_out` over, keep them without their bodies, and return the new mark."""
    handed(files[given_out:])
    files[given_out:] = [parsed.without_body() for parsed in files[given_out:]]
    return len(files)


def read_again(parsed: ParsedFile, settings: Settings) -> ParsedFile:
    """A light file (see collect) whole again, read from its file, which must be as it was read (same hash: the
    plan was made from that reading), under the id the plan gave it. SkipFile when it is not."""
    again = parse_file(Path(parsed.path), Path(parsed.root), settings, bundled=parsed.bundled)
    if again.source_hash != parsed.source_hash:
        raise SkipFile("the file changed while it was imported; the next import reads it")
    return dataclasses.replace(again, doc=again.doc.model_copy(update={"id": parsed.doc.id}), stat=parsed.stat)


def read_unread(collected: Collected, paths: set[str], settings: Settings) -> None:
    """Read these files passed over unread after all (reconcile.unsure says which), in scan order among the read."""
    found = sorted((collected.unread.pop(path) for path in paths), key=lambda unread: unread.after)
    files: list[ParsedFile] = []
    for position in range(len(collected.files) + 1):
        while found and found[0].after == position:
            unread = found.pop(0)
            try:
                files.append(parse_file(Path(unread.path), unread.root, settings, bundled=unread.bundled))
            except SkipFile as exc:
                collected.skipped.append(SkippedFile(path=unread.path, reason=str(exc)))
        if position < len(collected.files):
            files.append(collected.files[position])
    collected.files = files
