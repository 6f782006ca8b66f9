"""Import reconciliation: which file gets which id, and what is new, changed, unchanged or gone. Pure: no I/O.

The rules, in order:
- An id already stored for a file never changes (ids name one file forever), even when the scheme would now derive
  another one.
- A user's document never loses to a bundled one: the bundled document with the same id is shadowed (reported,
  not imported) while the user's exists.
- An explicit frontmatter id wins over a derived one; a derived id that is taken gets its hashed form (ids.py).
  A clash between two explicit ids is the only duplicate-id error: the later file is skipped with the reason.
- An id held by a stored document whose file is gone (a file moved or renamed with its explicit id) passes to the
  new file, history and all.
- A stored document whose file is gone from an imported folder, or whose file now carries another id, is removed
  (soft-deleted, recoverable); a file that failed to parse removes nothing.

Files passed over unread (their size, times and inode are the ones stored, see ingest.file_stat) are unchanged,
as long as nothing could make them matter: `unsure` names those that must be read after all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from sage_server.ids import document_id
from sage_server.ingest import ParsedFile
from sage_server.models import ShadowedFile, SkippedFile


@dataclass(frozen=True, slots=True)
class Stored:
    """What reconciliation needs to know of a stored document."""

    id: str
    source_path: str | None
    source_hash: str | None
    deleted: bool
    removed_by_import: bool  # deleted because its file went away (an import brings it back), not by a person
    bundled: bool = False  # imported from the knowledge that ships with SAGE
    source_stat: str | None = None  # what the last import saw of its file (ingest.file_stat)


@dataclass
class ImportPlan:
    """What one import run will do."""

    create: list[ParsedFile] = field(default_factory=list)
    update: list[ParsedFile] = field(default_factory=list)  # each replaces the stored document with its id
    unchanged: int = 0
    restat: list[tuple[str, str | None]] = field(default_factory=list)  # (id, stat) of unchanged files seen anew
    remove: list[Stored] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    shadowed: list[ShadowedFile] = field(default_factory=list)


def plan_import(
    files: Iterable[ParsedFile],
    stored: Iterable[Stored],
    folders: Iterable[str],
    seen: set[str],
    exists: Callable[[str], bool],
    unread: Collection[str] = (),
) -> ImportPlan:
    """Decide the import of `files` (read from `folders`; `seen` holds every Markdown path met, bad ones included)
    against the `stored` documents that matter: those imported from files, and those holding an id a file claims.
    `exists` tells whether a stored document's source file is still on disk. `unread`: the paths passed over unread,
    which `unsure` found nothing to say about: each is its stored document, unchanged, and claims no other id."""
    plan = ImportPlan(unchanged=len(unread))
    by_id = {s.id: s for s in stored}
    by_path = {s.source_path: s for s in by_id.values() if s.source_path}
    claims = _assign_ids(list(files), by_id, by_path, exists, plan)

    for parsed in claims.values():
        current = by_id.get(parsed.doc.id)
        if current is None:
            plan.create.append(parsed)
        elif (
            current.source_path == parsed.path
            and current.source_hash == parsed.source_hash
            and not current.removed_by_import
        ):
            plan.unchanged += 1  # an edit or a delete made through the API of an unchanged file is kept
            if parsed.stat != current.source_stat:
                plan.restat.append((current.id, parsed.stat))
        else:
            plan.update.append(parsed)

    claimed_by_path = {parsed.path: parsed.doc.id for parsed in claims.values()}
    roots = tuple(folder.rstrip(os.sep) + os.sep for folder in folders)
    for doc in by_id.values():
        path = doc.source_path
        if not path or doc.deleted or claims.get(doc.id) is not None:
            continue
        gone = path not in seen and path.startswith(roots)
        renamed = path in claimed_by_path and claimed_by_path[path] != doc.id
        if gone or renamed:
            plan.remove.append(doc)
    return plan


def skippable(stored: Iterable[Stored]) -> dict[str, str]:
    """Path -> stat of the files an import may pass over unread when their stat is still this one: those that are
    the source of exactly one stored document, not removed by an import (reading it brings that document back)."""
    # One pass and no list per path: a re-scan at 100k documents runs this over every one of them.
    stats: dict[str, str | None] = {}
    shared: set[str] = set()
    for doc in stored:
        if path := doc.source_path:
            if path in stats:
                shared.add(path)
            stats[path] = None if doc.removed_by_import else doc.source_stat
    return {path: stat for path, stat in stats.items() if stat is not None and path not in shared}


def unsure(files: Iterable[ParsedFile], unread: Mapping[str, str], stored: Iterable[Stored]) -> set[str]:
    """The `unread` files (path -> the stat that let it pass) to read after all, with the store as it is now (it may
    have changed since the files were scanned): those no longer skippable with that stat, and those holding an id a
    read file could take (the rules above could then give it another, or none, and that needs its content)."""
    stored = list(stored)
    still = skippable(stored)
    contested = set(claimed_ids(files))
    holders = {doc.source_path: doc.id for doc in stored if doc.source_path in unread}
    return {
        path
        for path, stat in unread.items()
        if still.get(path) != stat or holders.get(path) in contested or holders.get(path) is None
    }


def claimed_ids(files: Iterable[ParsedFile]) -> list[str]:
    """Every id the files could end up with (their own, and the hashed form of a derived one)."""
    ids = []
    for parsed in files:
        ids.append(parsed.doc.id)
        if parsed.id_parts is not None:
            ids.append(document_id(parsed.id_parts, hashed=True))
    return ids


def _assign_ids(
    files: list[ParsedFile],
    by_id: dict[str, Stored],
    by_path: dict[str, Stored],
    exists: Callable[[str], bool],
    plan: ImportPlan,
) -> dict[str, ParsedFile]:
    """The file that holds each id, after the rules above; losers are skipped, shadowed or re-derived."""
    # A known file keeps its stored id, whatever its name derives to now.
    files = [
        replace(f, doc=f.doc.model_copy(update={"id": by_path[f.path].id}))
        if f.id_parts is not None and f.path in by_path
        else f
        for f in files
    ]
    # Who goes first for a contested id: users before the bundled knowledge, known files before new ones, explicit
    # ids before derived ones; then the order the files were read in.
    order = sorted(
        range(len(files)),
        key=lambda i: (files[i].bundled, files[i].path not in by_path, files[i].id_parts is not None, i),
    )
    in_run = {f.path: f.doc.id for f in files}
    claims: dict[str, ParsedFile] = {}
    for index in order:
        parsed = files[index]
        while True:
            holder = claims.get(parsed.doc.id) or _stored_holder(parsed, by_id, in_run, exists)
            if holder is None:
                claims[parsed.doc.id] = parsed
                break
            owner = holder.path if isinstance(holder, ParsedFile) else holder.source_path
            if parsed.bundled and not holder.bundled:
                plan.shadowed.append(ShadowedFile(path=parsed.path, id=parsed.doc.id, by=owner or "the API"))
                break
            rederived = _hashed(parsed)
            if rederived is None:
                where = owner or "a document saved through the API"
                reason = f"duplicate id {parsed.doc.id!r}: already used by {where}"
                plan.skipped.append(SkippedFile(path=parsed.path, reason=reason))
                break
            parsed = rederived
    return claims


def _stored_holder(
    parsed: ParsedFile, by_id: dict[str, Stored], in_run: dict[str, str], exists: Callable[[str], bool]
) -> Stored | None:
    """The stored document that keeps `parsed` from taking its id, if any: a live one saved through the API, or
    a live one whose own file still exists and still carries that id (`in_run`: path -> id of this run's files)."""
    stored = by_id.get(parsed.doc.id)
    if stored is None or stored.source_path == parsed.path or stored.deleted:
        return None
    if stored.source_path is None:
        return stored
    if not exists(stored.source_path) or in_run.get(stored.source_path, stored.id) != stored.id:
        return None  # its file moved, was renamed or now carries another id: this one takes the id over
    if not parsed.bundled and stored.bundled:
        return None  # a user's document takes the id over from a bundled one
    return stored


def _hashed(parsed: ParsedFile) -> ParsedFile | None:
    """`parsed` with the hashed form of its derived id, or None when its id is explicit or already hashed."""
    if parsed.id_parts is None:
        return None
    hashed = document_id(parsed.id_parts, hashed=True)
    if hashed == parsed.doc.id:
        return None
    return replace(parsed, doc=parsed.doc.model_copy(update={"id": hashed}))
