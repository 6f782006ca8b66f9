"""Moving a knowledge base between stores: `sage export` writes everything a store holds to a portable file
(export_format.py), `sage import --from-export` loads one into the configured store, SQLite or PostgreSQL.

An import runs in one write transaction (a failure leaves the target as it was), gives the database a new identity
and a generation above both the target's and the export's, so no cache entry keyed by identity and generation can
answer from before it. The source's identity is recorded in the export's header and in the import's audit entry.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from sage_server.audit import Entry
from sage_server.auth import current_caller
from sage_server.config import Settings
from sage_server.errors import Conflict, InvalidInput
from sage_server.export_format import (
    ExportEnd,
    ExportHeader,
    check_checksum,
    described,
    open_for_reading,
    open_for_writing,
    read_header,
    records,
    verify_export,
    write_checksum,
)
from sage_server.locks import FileLock, serving_lock_path
from sage_server.store import AuditRow, Store, Writer, open_store
from sage_server.store.export_records import KINDS, AuditRecord, ExportRecord, Kind
from sage_server.version import __version__

BATCH = 500  # records loaded per statement batch: memory stays bounded whatever the size of the export
SUFFIX = ".export.jsonl.gz"


class ExportReport(BaseModel):
    """An export written: where, how big, its checksum, what it holds."""

    path: str
    bytes: int
    sha256: str
    counts: dict[Kind, int]
    seconds: float


class ImportReport(BaseModel):
    """An export loaded: what it held, the target's new identity and generation, and where the data it replaced
    was saved first (None when the target was empty)."""

    path: str
    counts: dict[Kind, int]
    source_backend: str
    source_database_id: str
    database_id: str
    generation: int
    replaced_saved_at: str | None
    seconds: float


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


async def export_store(store: Store, path: Path) -> ExportReport:
    """Write everything `store` holds to `path` from one snapshot (consistent while others write), streamed, then
    `<path>.sha256` beside it. Written to `<path>.partial` first: a failed export leaves no file that looks whole."""
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        async with store.snapshot() as reader:
            counts = await reader.counts()
            database_id, created = await reader.identity()
            header = ExportHeader(
                sage_version=__version__,
                backend=store.backend,
                created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
                database_id=database_id,
                database_created_at=created.isoformat(timespec="microseconds"),
                generation=await reader.generation(),
                counts=counts,
            )
            with open_for_writing(partial, compress=path.name.endswith(".gz")) as out:
                out.write(header.model_dump_json() + "\n")
                written: dict[Kind, int] = dict.fromkeys(KINDS, 0)
                for kind in KINDS:
                    async for record in reader.dump(kind):
                        out.write(record.model_dump_json() + "\n")
                        written[kind] += 1
                out.write(ExportEnd(counts=written).model_dump_json() + "\n")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    digest = write_checksum(path)
    return ExportReport(
        path=str(path),
        bytes=path.stat().st_size,
        sha256=digest,
        counts=written,
        seconds=round(time.perf_counter() - started, 3),
    )


async def import_export(
    store: Store,
    path: Path,
    *,
    replace: bool = False,
    force: bool = False,
    safety_dir: Path,
    operation: str = "import_export",
    checksum: bool = True,
) -> ImportReport:
    """Load the export at `path` into `store`, in one transaction, after checking its checksum (unless `checksum`
    is False) and verifying it. A target holding anything is refused unless `replace`; then what it holds is first
    exported to `safety_dir`, and on PostgreSQL other connected clients (running instances) refuse it unless
    `force`."""
    started = time.perf_counter()
    if checksum:
        check_checksum(path)
    report = verify_export(path)
    failed = [c for c in report.checks if not c.ok and (checksum or c.name != "checksum")]
    if failed:
        problems = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        raise InvalidInput(f"{path} is not a sound SAGE export ({problems}); nothing was changed", path=str(path))
    saved = await _make_room(store, replace=replace, force=force, name=f"pre-{operation.split('_')[0]}", to=safety_dir)
    with open_for_reading(path) as lines:
        header = read_header(lines, path)
        database_id = uuid.uuid4().hex
        async with store.transaction() as writer:
            carried: list[AuditRow] = []
            if any((await writer.counts()).values()):
                if not replace:
                    raise Conflict(f"{store.location} was written to meanwhile; nothing was changed")
                if operation == "restore_backup":  # the trail must survive a restore, as on SQLite
                    carried = [_audit_row(r) async for r in writer.dump("audit") if _newer(r, header.created_at)]
                await writer.clear()
            current = await writer.generation()
            await _load(writer, records(lines, path))
            await writer.finish_load(database_id, header.database_created_at, max(current, header.generation))
            detail: dict[str, object] = {"source_backend": header.backend, "source_database_id": header.database_id}
            detail |= {"saved": saved, "carried": len(carried)}
            entry = Entry(operation, target=str(path), detail=detail).row(current_caller())
            await writer.insert_audit([*carried, entry])
            generation = await writer.bump_generation(None)
        await store.analyze()  # a whole knowledge base was just written: plan searches for it, not for an empty one
    return ImportReport(
        path=str(path),
        counts=header.counts,
        source_backend=header.backend,
        source_database_id=header.database_id,
        database_id=database_id,
        generation=generation,
        replaced_saved_at=saved,
        seconds=round(time.perf_counter() - started, 3),
    )


async def _make_room(store: Store, *, replace: bool, force: bool, name: str, to: Path) -> str | None:
    """Refuse to load into a store holding anything unless `replace`, and while other clients are connected unless
    `force`; export what it holds to the folder `to` first. The path of that safety export, if one was made."""
    async with store.read() as reader:
        held = await reader.counts()
    if not any(held.values()):
        return None
    if not replace:
        raise Conflict(
            f"{store.location} is not empty ({described(held)}); pass --replace to replace it (what it holds is "
            "exported first); nothing was changed",
            location=store.location,
        )
    others = await store.other_sessions()
    if others and not force:
        raise Conflict(
            f"{store.location} has other clients connected ({', '.join(others[:5])}): stop every SAGE instance "
            "using it first, or pass --force if they may stay (they must be restarted after); nothing was changed",
            location=store.location,
        )
    return (await export_store(store, to / f"{name}-{stamp()}{SUFFIX}")).path


async def _load(writer: Writer, stream: Iterator[ExportRecord]) -> None:
    """Load records in batches: memory holds one batch, whatever the size of the export."""
    batch: list[ExportRecord] = []
    for record in stream:
        batch.append(record)
        if len(batch) >= BATCH:
            await writer.load(batch)
            batch = []
    await writer.load(batch)


def _newer(record: ExportRecord, than: str) -> bool:
    return isinstance(record, AuditRecord) and record.at > than


def _audit_row(record: ExportRecord) -> AuditRow:
    assert isinstance(record, AuditRecord)
    detail = json.dumps(record.detail, ensure_ascii=False)
    fields = (record.at, record.key_name, record.client, record.operation, record.target, record.revision)
    return (*fields, record.outcome, record.count, detail)


def refuse_if_served(settings: Settings) -> None:
    """For a SQLite target: refuse while a SAGE server has the file open (PostgreSQL: see Store.other_sessions)."""
    if settings.database_url is not None or not settings.db_path.exists():
        return
    with FileLock(serving_lock_path(settings.db_path)) as in_use:
        if not in_use.acquire():
            raise Conflict(
                f"{settings.db_path} is in use by a running SAGE server (sage serve or sage mcp); stop it first, "
                "then import; nothing was changed",
                path=str(settings.db_path),
            )


async def export_settings(settings: Settings, path: Path) -> ExportReport:
    """`sage export PATH`: export the store the settings choose."""
    if settings.database_url is None and not settings.db_path.is_file():
        raise InvalidInput(f"{settings.db_path}: no such database file; nothing to export", path=str(settings.db_path))
    store = open_store(settings)
    await store.open()
    try:
        return await export_store(store, path)
    finally:
        await store.close()


async def import_settings(
    settings: Settings,
    path: Path,
    *,
    replace: bool,
    force: bool,
    operation: str = "import_export",
    checksum: bool = True,
) -> ImportReport:
    """`sage import --from-export PATH` (and `sage restore --backup` of an export): load it into the store the
    settings choose; what it replaces is saved in the backup folder first."""
    if replace and not force:
        refuse_if_served(settings)
    store = open_store(settings)
    await store.open()
    try:
        return await import_export(
            store,
            path,
            replace=replace,
            force=force,
            safety_dir=settings.backup_dir,
            operation=operation,
            checksum=checksum,
        )
    finally:
        await store.close()
