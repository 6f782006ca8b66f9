"""Document ids: the one scheme that names every imported file, and every title-derived id.

A file's id is made from its path inside the imported folder, layer folder included, so files in different folders
never share one. The parts are joined with '.'; each part keeps its letters (case too), digits, '_' and '-', and
spaces become '-'. A part holding anything else (punctuation, a '.') has it replaced by '-', and the id then ends
with a short hash of the exact path, so names that differ only in punctuation still get distinct ids:

    core/INDEX.md                 core.INDEX
    guidelines/INDEX.md           guidelines.INDEX
    frameworks/autonomy/LEVELS.md frameworks.autonomy.LEVELS
    practices/clang.md            practices.clang
    practices/clang++.md          practices.clang-63b6e8
    notes/qm-move_disk.md         notes.qm-move_disk
    notes/qm-move-disk.md         notes.qm-move-disk

The rest of the rules live in the import: an explicit `id:` in the frontmatter wins over a derived one; an id already
stored for a file never changes; and a derived id that is already taken (two names that differ only by spaces and
dashes, say) gets the hashed form.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from pathlib import PurePath

MAX_ID_CHARS = 128
HASH_CHARS = 6
SEPARATOR = "."
_SPACES = re.compile(r"\s+")
# Unicode letters and digits, '_' and '-' stay; every run of anything else becomes one '-'.
_OTHER = re.compile(r"[^\w-]+")
# In a title, dashes are punctuation like the rest ('Retries - a primer' -> 'retries-a-primer').
_TITLE_OTHER = re.compile(r"[^\w]+")


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("/".join(parts).encode("utf-8")).hexdigest()[:HASH_CHARS]


def document_id(parts: Sequence[str], *, exact: bool = True, hashed: bool = False) -> str:
    """The id for a name made of `parts` (folders then a file stem, or a single title).

    With `exact` (file paths), distinct inputs get distinct ids: a part that had to lose characters other than
    spaces makes the id end with a hash of the input (as does `hashed`, for a readable id already taken). Without
    `exact` (titles), the id is a plain lower-case slug, and a collision is the caller's to refuse.
    """
    if not exact:
        slug = _TITLE_OTHER.sub("-", unicodedata.normalize("NFC", " ".join(parts)).lower()).strip("-")
        return slug[:MAX_ID_CHARS].rstrip("-") or _digest(parts)
    cleaned: list[str] = []
    lossy = hashed
    for part in parts:
        text = unicodedata.normalize("NFC", _SPACES.sub("-", part.strip()))
        slug = _OTHER.sub("-", text).strip("-")
        lossy = lossy or slug != text or text != _SPACES.sub("-", part.strip())
        if slug:
            cleaned.append(slug)
    base = SEPARATOR.join(cleaned)
    if not lossy and base and len(base) <= MAX_ID_CHARS:
        return base
    base = base[: MAX_ID_CHARS - HASH_CHARS - 1].rstrip("-.")
    return f"{base}-{_digest(parts)}" if base else _digest(parts)


def path_parts(relative: PurePath, layer_folder: str | None = None) -> list[str]:
    """The name parts of a Markdown file at `relative` inside an imported folder. `layer_folder` names the imported
    folder itself when it is a layer folder, so importing `kb/practices` gives the ids that importing `kb` does."""
    # Only '.md' is dropped: x.markdown and x.md are different files, so other suffixes stay part of the name.
    name = relative.stem if relative.suffix == ".md" else relative.name
    folders = [layer_folder] if layer_folder is not None else []
    return [*folders, *relative.parent.parts, name]


def title_id(title: str) -> str:
    """The id derived from a document's title when none is given ('Rate Limits' -> 'rate-limits')."""
    return document_id([title], exact=False)
