"""The portable export format (`sage export`, and backups of a PostgreSQL store): JSON Lines, gzip-compressed when
the file name ends in `.gz`, with its sha256 in `<file>.sha256` beside it.

Line 1 is the header (format name and version, SAGE version, source backend, database identity and generation,
record counts, when it was written); then one record per line, `{"type": ...}`, all documents, then revisions,
aliases, keys and audit entries (store/export_records.py lists their fields); the last line is `{"type": "end"}`
with the counts written, so a truncated file is told from a complete one even without its checksum.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Literal

from pydantic import BaseModel, TypeAdapter, ValidationError

from sage_server.errors import InvalidInput
from sage_server.models import DocumentIn
from sage_server.store import Check, VerifyReport, content_hash
from sage_server.store.export_records import (
    KINDS,
    AliasRecord,
    AuditRecord,
    DocumentRecord,
    ExportRecord,
    KeyRecord,
    Kind,
    RevisionRecord,
)

FORMAT: Literal["sage-export"] = "sage-export"
VERSION = 1
GZIP_MAGIC = b"\x1f\x8b"
_RECORD: TypeAdapter[ExportRecord] = TypeAdapter(ExportRecord)
LABELS: dict[Kind, str] = {
    "document": "documents",
    "revision": "older revisions",
    "alias": "aliases",
    "key": "keys",
    "audit": "audit entries",
}


def described(counts: dict[Kind, int]) -> str:
    """Counts of records for people: "10 documents, 3 older revisions, ..."."""
    return ", ".join(f"{counts.get(kind, 0)} {LABELS[kind]}" for kind in KINDS)


class ExportHeader(BaseModel):
    """The first line of an export."""

    format: Literal["sage-export"] = FORMAT
    version: int = VERSION
    sage_version: str
    backend: str
    created_at: str
    database_id: str
    database_created_at: str
    generation: int
    counts: dict[Kind, int]


class ExportEnd(BaseModel):
    """The last line of an export: the counts of the records written."""

    type: Literal["end"] = "end"
    counts: dict[Kind, int]


def is_export(path: Path) -> bool:
    """Whether `path` names an export rather than a SQLite database (by its name, or by its first bytes)."""
    if ".jsonl" in path.name:
        return True
    try:
        with path.open("rb") as file:
            start = file.read(16)
    except OSError:
        return False
    return start.startswith(GZIP_MAGIC) or start.startswith(b'{"format"')


@contextmanager
def open_for_writing(path: Path, compress: bool) -> Iterator[IO[str]]:
    """A text file to write an export to, gzip-compressed or not."""
    if compress:
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=6, newline="\n") as file:
            yield file
    else:
        with path.open("w", encoding="utf-8", newline="\n") as file:
            yield file


@contextmanager
def open_for_reading(path: Path) -> Iterator[IO[str]]:
    """An export's lines, compressed or not (told by its first bytes, not its name)."""
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the export: {exc.strerror or exc}", path=str(path)) from exc
    with raw:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        binary: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw  # type: ignore[assignment]
        with io.TextIOWrapper(binary, encoding="utf-8", newline="\n") as text:
            yield text


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path) -> Path:
    """Where a file's checksum is written: `<name>.sha256` beside it."""
    return path.with_name(path.name + ".sha256")


def write_checksum(path: Path) -> str:
    """Write `<path>.sha256` (sha256sum's format); the digest."""
    digest = sha256_of(path)
    checksum_path(path).write_text(f"{digest}  {path.name}\n")
    return digest


def check_checksum(path: Path) -> None:
    """Refuse a file whose bytes differ from the checksum written beside it, or that has none."""
    expected_file = checksum_path(path)
    try:
        expected = expected_file.read_text(encoding="utf-8").split()[0]
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise InvalidInput(
            f"{path}: no readable checksum beside it ({expected_file.name}); a backup written by `sage backup` "
            "has one. To restore a copy without it anyway, pass --no-checksum; nothing was changed",
            path=str(path),
        ) from exc
    actual = sha256_of(path)
    if actual != expected:
        raise InvalidInput(
            f"{path}: its sha256 is {actual[:16]}…, but {expected_file.name} says {expected[:16]}…; the file "
            "changed after it was written; nothing was changed",
            path=str(path),
        )


def read_header(lines: IO[str], path: Path) -> ExportHeader:
    """The header line, or a clear refusal of what is not a SAGE export (of a version this SAGE reads)."""
    try:
        first = json.loads(lines.readline() or "null")
    except (ValueError, EOFError, OSError) as exc:
        raise InvalidInput(f"{path}: not a SAGE export (its first line is not JSON: {exc})", path=str(path)) from exc
    if not isinstance(first, dict) or first.get("format") != FORMAT:
        raise InvalidInput(f"{path}: not a SAGE export (no '{FORMAT}' header line)", path=str(path))
    if first.get("version") != VERSION:
        raise InvalidInput(
            f"{path}: export format version {first.get('version')}; this SAGE reads version {VERSION}",
            path=str(path),
        )
    try:
        return ExportHeader.model_validate(first)
    except ValidationError as exc:
        raise InvalidInput(f"{path}: the export's header is malformed: {exc.errors()[0]['msg']}") from exc


def records(lines: IO[str], path: Path) -> Iterator[ExportRecord]:
    """The records after the header, checked one by one: known fields, kinds in order, and an end line whose
    counts match what was read (a file cut short, or with lines added or lost, is refused)."""
    seen: dict[Kind, int] = dict.fromkeys(KINDS, 0)
    order = 0
    for number, line in enumerate(lines, start=2):
        try:
            if line.startswith(('{"type":"end"', '{"type": "end"')):
                end = ExportEnd.model_validate_json(line)
                if end.counts != seen:
                    raise InvalidInput(f"{path}: the end line counts {end.counts}, but the file holds {seen}")
                if lines.readline():
                    raise InvalidInput(f"{path}: line {number + 1}: lines after the end line")
                return
            record = _RECORD.validate_json(line)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise InvalidInput(f"{path}: line {number}: {where}: {problem['msg']}", path=str(path)) from exc
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InvalidInput(f"{path}: line {number}: unreadable: {exc}", path=str(path)) from exc
        position = KINDS.index(record.type)
        if position < order:
            raise InvalidInput(f"{path}: line {number}: a {record.type} record after the {KINDS[order]} records")
        order = position
        seen[record.type] += 1
        yield record
    raise InvalidInput(f"{path}: the export ends without its end line: it was cut short", path=str(path))


def verify_export(path: Path) -> VerifyReport:
    """Check an export: its checksum, its format (header, every record, the end line), and that it is consistent:
    every document and revision matches its content hash, every document's revisions run 1..current-1, every
    revision and alias names a document in it, keys and audit sequence numbers are unique."""
    checks: list[Check] = []
    try:
        check_checksum(path)
        checks.append(Check(name="checksum", ok=True, detail=f"matches {checksum_path(path).name}"))
    except InvalidInput as exc:
        checks.append(Check(name="checksum", ok=False, detail=exc.message))
    consistency = _Consistency()
    try:
        with open_for_reading(path) as lines:
            header = read_header(lines, path)
            for record in records(lines, path):
                consistency.add(record)
        if header.counts != consistency.counts:
            raise InvalidInput(f"the header counts {header.counts}, but the file holds {consistency.counts}")
        detail = f"version {header.version} from {header.backend}: {described(consistency.counts)}"
        checks.append(Check(name="format", ok=True, detail=detail))
        checks += consistency.checks()
    except (InvalidInput, OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        checks.append(Check(name="format", ok=False, detail=getattr(exc, "message", str(exc))))
    return VerifyReport(path=str(path), ok=all(c.ok for c in checks), checks=checks)


class _Consistency:
    """What verify_export learns record by record (ids and numbers only, never bodies: bounded at 100k documents)."""

    def __init__(self) -> None:
        self.counts: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self.revisions: dict[str, int] = {}  # document id -> its current revision
        self.next_revision: dict[str, int] = {}  # document id -> the superseded revision expected next
        self.bad_hashes: list[str] = []
        self.bad_chains: list[str] = []
        self.orphans: list[str] = []
        self.duplicates: list[str] = []
        self.key_names: set[str] = set()
        self.digests: set[str] = set()
        self.last_seq = 0

    def add(self, record: ExportRecord) -> None:
        self.counts[record.type] += 1
        if isinstance(record, DocumentRecord):
            if record.id in self.revisions:
                self.duplicates.append(f"document {record.id}")
            self.revisions[record.id] = record.revision
            self._hash(record, record.id, record.content_hash)
        elif isinstance(record, RevisionRecord):
            if record.doc_id not in self.revisions:
                self.orphans.append(f"revision {record.doc_id}@{record.revision}")
                return
            expected = self.next_revision.get(record.doc_id, 1)
            if record.revision != expected:
                self.bad_chains.append(record.doc_id)
            self.next_revision[record.doc_id] = record.revision + 1
            self._hash(record, f"{record.doc_id}@{record.revision}", record.content_hash)
        elif isinstance(record, AliasRecord):
            if record.doc_id not in self.revisions:
                self.orphans.append(f"alias {record.alias}")
        elif isinstance(record, KeyRecord):
            if record.name in self.key_names or record.digest in self.digests:
                self.duplicates.append(f"key {record.name}")
            self.key_names.add(record.name)
            self.digests.add(record.digest)
        elif isinstance(record, AuditRecord):
            if record.seq <= self.last_seq:
                self.duplicates.append(f"audit entry {record.seq}")
            self.last_seq = record.seq

    def _hash(self, record: DocumentRecord | RevisionRecord, name: str, expected: str) -> None:
        fields = record.model_dump(include=set(DocumentIn.model_fields) - {"id"})
        doc_id = record.id if isinstance(record, DocumentRecord) else record.doc_id
        try:
            same = content_hash(DocumentIn.model_validate({**fields, "id": doc_id})) == expected
        except (ValidationError, ValueError):
            same = False
        if not same:
            self.bad_hashes.append(name)

    def checks(self) -> list[Check]:
        broken = [doc_id for doc_id, current in self.revisions.items() if self.next_revision.get(doc_id, 1) != current]
        chains = sorted(set(self.bad_chains + broken))
        hashed = self.counts["document"] + self.counts["revision"]
        problems = self.orphans + self.duplicates
        return [
            Check(
                name="content hashes",
                ok=not self.bad_hashes,
                detail=f"{len(self.bad_hashes)} differ: {self.bad_hashes[:5]}"
                if self.bad_hashes
                else f"{hashed} documents and revisions match their hashes",
            ),
            Check(
                name="revision history",
                ok=not chains,
                detail=f"gaps in {chains[:5]}" if chains else "every document's revisions run 1..current",
            ),
            Check(
                name="references",
                ok=not problems,
                detail=f"{len(problems)} problems: {problems[:5]}"
                if problems
                else "every revision and alias names a document; keys and audit entries are unique",
            ),
        ]
