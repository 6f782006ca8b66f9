"""The `sage` command: a thin adapter over KnowledgeService, human output by default and --json for scripts."""

from __future__ import annotations

import gc
import importlib.util
import json
import re
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import click
from pydantic import BaseModel

from sage_server.config import LoadedSettings, Settings, describe, load_settings
from sage_server.errors import ConfigError, InvalidInput, SageError
from sage_server.evaluate import EvalReport, load_queries, run_eval
from sage_server.logs import setup_logging
from sage_server.models import (
    ContextResult,
    Document,
    DocumentList,
    Health,
    History,
    ImportReport,
    Info,
    SearchResult,
)
from sage_server.resources import knowledge_dir
from sage_server.service import KnowledgeService, open_service
from sage_server.version import __version__

T = TypeVar("T")
EXIT_SKIPPED = 3
EXIT_UNHEALTHY = 4


@dataclass
class CliState:
    """What the top-level options decided: the overrides given and the settings they produced."""

    overrides: dict[str, Any]
    loaded: LoadedSettings


def _settings(ctx: click.Context, **extra: Any) -> Settings:
    """The effective settings; `extra` are a subcommand's own flags (e.g. serve --port), applied on top."""
    state: CliState = ctx.obj
    if not any(v is not None for v in extra.values()):
        return state.loaded.settings
    return load_settings({**state.overrides, **extra}).settings


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"sage: {message}", err=True)
    sys.exit(code)


class SageGroup(click.Group):
    """The `sage` group, and the CLI's one error handler: any SageError a command raises becomes one line on stderr
    and its exit code; anything unexpected, one line and exit 1 (a traceback only with SAGE_DEBUG=true)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # usage errors, --help, Ctrl-C: click reports them itself
        except Exception as exc:  # the outermost layer: report once, never a bare traceback
            state = ctx.obj if isinstance(ctx.obj, CliState) else None
            if state is not None and state.loaded.settings.debug:
                traceback.print_exc()
            if isinstance(exc, ConfigError):
                _fail(f"config error: {exc.message}", exc.exit_code)
            if isinstance(exc, SageError):
                _fail(f"{exc.code}: {exc.message}", exc.exit_code)
            _fail(f"internal error: {type(exc).__name__}: {exc} (set SAGE_DEBUG=true for a traceback)", 1)


def run(ctx: click.Context, action: Callable[[KnowledgeService], Awaitable[T]], import_first: bool = True) -> T:
    """Open the service, run `action`, close (errors go to the group's handler). Commands about the database itself
    (keys, the audit trail) pass `import_first=False`: no knowledge folder is imported before them."""
    settings = _settings(ctx)
    if not import_first:
        settings = settings.model_copy(update={"import_on_start": False})

    async def main() -> T:
        async with open_service(settings) as kb:
            return await action(kb)

    return anyio.run(main)


def emit(model: BaseModel, as_json: bool, human: Callable[[], None]) -> None:
    """Print a result as JSON or for a person."""
    if as_json:
        click.echo(model.model_dump_json(indent=2))
    else:
        human()


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
layer_option = click.option("--layer", "layers", multiple=True, help="Only this layer (repeatable).")
tag_option = click.option("--tag", "tags", multiple=True, help="Only documents with this tag (repeatable).")


@click.group(cls=SageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sage")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Config file (SAGE_CONFIG_PATH).")
@click.option("--db", "db_path", type=click.Path(path_type=Path), help="SQLite database file (SAGE_DB_PATH).")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    help="Logging level (SAGE_LOG_LEVEL).",
)
@click.option("--debug/--no-debug", default=None, help="Tracebacks on errors (SAGE_DEBUG).")
@click.option("--no-import", is_flag=True, default=False, help="Do not import knowledge folders on start.")
@click.pass_context
def main(
    ctx: click.Context,
    config_path: Path | None,
    db_path: Path | None,
    log_level: str | None,
    debug: bool | None,
    no_import: bool,
) -> None:
    """SAGE: a team's knowledge in SQLite, served to AI assistants over MCP."""
    overrides: dict[str, Any] = {
        "config_path": config_path,
        "db_path": db_path,
        "log_level": log_level,
        "debug": debug,
        "import_on_start": False if no_import else None,
    }
    ctx.obj = CliState(overrides, load_settings(overrides))
    setup_logging(ctx.obj.loaded.settings.log_level)


@main.command()
@click.argument("target")
@json_option
@click.pass_context
def get(ctx: click.Context, target: str, as_json: bool) -> None:
    """Print one document by ID, or every document of a LAYER (e.g. `sage get core`)."""
    if target in _settings(ctx).layers:

        async def whole_layer(kb: KnowledgeService) -> list[Document]:
            listing = await kb.list(layer=target, limit=100)
            return [await kb.get(item.id) for item in listing.items]

        docs = run(ctx, whole_layer)
        if as_json:
            click.echo(json.dumps([d.model_dump(mode="json") for d in docs], indent=2, ensure_ascii=False))
        else:
            click.echo("\n\n---\n\n".join(d.body.rstrip() for d in docs))
        return
    doc = run(ctx, lambda kb: kb.get(target))
    emit(doc, as_json, lambda: click.echo(doc.body.rstrip()))


@main.command(name="search")
@click.argument("query")
@layer_option
@tag_option
@click.option("--limit", default=10, show_default=True, help="Hits per page (1-100).")
@click.option("--cursor", default=None, help="next_cursor from the previous page.")
@click.option("--explain", is_flag=True, help="Show why each hit ranked where it did.")
@json_option
@click.pass_context
def search_command(
    ctx: click.Context,
    query: str,
    layers: tuple[str, ...],
    tags: tuple[str, ...],
    limit: int,
    cursor: str | None,
    explain: bool,
    as_json: bool,
) -> None:
    """Full-text search (any text; "phrases" and prefix* work)."""
    result: SearchResult = run(ctx, lambda kb: kb.search(query, list(layers), list(tags), limit, cursor, explain))

    def human() -> None:
        if result.partial:
            click.echo(f"note: partial result: {result.partial_reason}", err=True)
        if result.corrected_query:
            click.echo(f"(showing results for: {result.corrected_query})")
        if not result.hits:
            click.echo("No matches.")
        if result.terms:
            click.echo(
                "terms: "
                + ", ".join(
                    f"{t.searched} (in {t.documents} docs, idf {t.idf:.2f}{', ' + t.note if t.note else ''})"
                    for t in result.terms
                )
            )
        for hit in result.hits:
            click.echo(f"{hit.score:8.2f}  {hit.id}  [{hit.layer}]  {hit.title}")
            click.echo(f"          {hit.snippet}")
            if hit.explain:
                why = hit.explain
                parts = "  ".join(f"{name} {value:.2f}x{why.weights[name]:g}" for name, value in why.parts.items())
                fields = "  ".join(f"{name} {value:.2f}" for name, value in why.bm25_fields.items())
                click.echo(f"          score = {parts}")
                click.echo(
                    f"          BM25 {why.bm25:.2f}: {fields or 'no field alone'}; holds {', '.join(why.matched)}"
                )
        if result.next_cursor:
            click.echo(f"more: --cursor {result.next_cursor}")

    emit(result, as_json, human)


@main.command(name="context")
@click.argument("task")
@click.option("--max-tokens", type=int, default=None, help="Token budget (default: context_max_tokens).")
@layer_option
@json_option
@click.pass_context
def context_command(
    ctx: click.Context, task: str, max_tokens: int | None, layers: tuple[str, ...], as_json: bool
) -> None:
    """Print what to read before doing TASK, packed under a token budget, with citations."""
    result: ContextResult = run(ctx, lambda kb: kb.context(task, max_tokens, list(layers)))

    def human() -> None:
        click.echo(result.text.rstrip())
        if result.partial:
            click.echo(f"note: partial result: {result.partial_reason}", err=True)
        note = f"\n[{result.tokens_used}/{result.max_tokens} tokens"
        if result.omitted:
            note += f"; {len(result.omitted)} relevant sections left out for budget"
        click.echo(note + "]", err=True)

    emit(result, as_json, human)


@main.command(name="list")
@click.option("--layer", default=None, help="Only this layer.")
@tag_option
@click.option("--limit", default=50, show_default=True, help="Documents per page (1-100).")
@click.option("--cursor", default=None, help="next_cursor from the previous page.")
@json_option
@click.pass_context
def list_command(
    ctx: click.Context, layer: str | None, tags: tuple[str, ...], limit: int, cursor: str | None, as_json: bool
) -> None:
    """List documents by layer and id."""
    result: DocumentList = run(ctx, lambda kb: kb.list(layer, list(tags), limit, cursor))

    def human() -> None:
        for item in result.items:
            click.echo(f"{item.layer:<11} {item.id:<36} {item.title}")
        click.echo(f"({len(result.items)} of {result.total})")
        if result.next_cursor:
            click.echo(f"more: --cursor {result.next_cursor}")

    emit(result, as_json, human)


@main.command()
@json_option
@click.pass_context
def info(ctx: click.Context, as_json: bool) -> None:
    """Show what the knowledge base holds."""
    result: Info = run(ctx, lambda kb: kb.info())

    def human() -> None:
        where = f"{result.backend} {result.db_path}"
        click.echo(f"SAGE {result.version}  database {where}  generation {result.generation}")
        for layer, count in result.layers.items():
            click.echo(f"  {layer:<12} {count:>6} documents")
        click.echo(f"  {'total':<12} {result.documents:>6} documents, ~{result.tokens} tokens")

    emit(result, as_json, human)


@main.command(name="import")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--from-export",
    "export_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Load a `sage export` file (from SQLite or PostgreSQL) into the configured store instead.",
)
@click.option("--replace", is_flag=True, help="With --from-export: replace what the store holds (exported first).")
@click.option("--force", is_flag=True, help="With --replace: even while other clients are connected (PostgreSQL).")
@click.option("--no-checksum", is_flag=True, help="With --from-export: load a file without its .sha256 (verified).")
@json_option
@click.pass_context
def import_command(
    ctx: click.Context,
    paths: tuple[Path, ...],
    export_path: Path | None,
    replace: bool,
    force: bool,
    no_checksum: bool,
    as_json: bool,
) -> None:
    """Import Markdown files and folders (incremental; exit code 3 if any file was skipped), or with --from-export
    load a whole knowledge base: documents, revisions, deletions, keys and audit trail, in one transaction."""
    if export_path is not None:
        if paths:
            _fail("give either PATHS (Markdown) or --from-export PATH (an export), not both", 2)
        _import_export(ctx, export_path, replace=replace, force=force, checksum=not no_checksum, as_json=as_json)
        return
    if not paths:
        _fail("give the Markdown files or folders to import, or --from-export PATH", 2)
    report: ImportReport = run(ctx, lambda kb: kb.import_paths(list(paths)))

    def human() -> None:
        click.echo(
            f"scanned {report.scanned}: {report.created} created, {report.updated} updated, "
            f"{report.unchanged} unchanged, {report.removed} removed, {len(report.skipped)} skipped "
            f"({report.duration_ms:.0f} ms)"
        )
        for skipped in report.skipped:
            click.echo(f"skipped {skipped.path}: {skipped.reason}", err=True)
        for shadowed in report.shadowed:
            click.echo(f"bundled {shadowed.id} is shadowed by your {shadowed.by}", err=True)

    emit(report, as_json, human)
    if report.skipped:
        sys.exit(EXIT_SKIPPED)


def _import_export(
    ctx: click.Context, path: Path, *, replace: bool, force: bool, checksum: bool, as_json: bool
) -> None:
    from sage_server import export
    from sage_server.export_format import described

    settings = _settings(ctx)
    report = anyio.run(lambda: export.import_settings(settings, path, replace=replace, force=force, checksum=checksum))

    def human() -> None:
        click.echo(
            f"loaded {path} (from {report.source_backend}): {described(report.counts)}; new database identity "
            f"{report.database_id[:12]}…, generation {report.generation} ({report.seconds:.1f} s)"
        )
        if report.replaced_saved_at:
            click.echo(f"what it replaced was exported first to {report.replaced_saved_at}")

    emit(report, as_json, human)


@main.command(name="export")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
@click.pass_context
def export_command(ctx: click.Context, path: Path, as_json: bool) -> None:
    """Write the whole knowledge base (documents live and deleted, revisions, aliases, keys as digests, the audit
    trail) to PATH as JSON Lines, gzip-compressed if PATH ends in .gz, with PATH.sha256 beside it."""
    from sage_server import export
    from sage_server.export_format import described

    settings = _settings(ctx)
    report = anyio.run(export.export_settings, settings, path)

    def human() -> None:
        counts = described(report.counts)
        click.echo(
            f"{report.path}: {counts}; {report.bytes} bytes, sha256 {report.sha256[:16]}… ({report.seconds:.1f} s)"
        )

    emit(report, as_json, human)


@main.command()
@click.argument("doc_id")
@json_option
@click.pass_context
def history(ctx: click.Context, doc_id: str, as_json: bool) -> None:
    """Show every revision of a document."""
    result: History = run(ctx, lambda kb: kb.history(doc_id))

    def human() -> None:
        state = " (deleted)" if result.deleted else ""
        click.echo(f"{result.id}{state}")
        for rev in result.revisions:
            click.echo(f"  rev {rev.revision:<4} {rev.change:<8} {rev.created_at:%Y-%m-%d %H:%M:%S}  {rev.title}")

    emit(result, as_json, human)


@main.command()
@click.argument("doc_id", required=False)
@click.argument("revision", type=int, required=False)
@click.option("--backup", "backup_path", type=click.Path(path_type=Path), help="Restore the database from a backup.")
@click.option(
    "--no-checksum", is_flag=True, help="Restore a backup that has no .sha256 beside it (it is still verified)."
)
@click.option(
    "--force", is_flag=True, help="PostgreSQL: restore even while other clients are connected (restart them after)."
)
@json_option
@click.pass_context
def restore(
    ctx: click.Context,
    doc_id: str | None,
    revision: int | None,
    backup_path: Path | None,
    no_checksum: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Make REVISION of document DOC_ID current again (also undeletes it), or, with --backup PATH, replace the
    whole database with a backup that matches its checksum and verifies (what it replaces is kept first).
    Refused while a SAGE server uses the database: stop it first."""
    if backup_path is not None:
        if doc_id is not None:
            _fail("give either DOC_ID REVISION or --backup PATH, not both", 2)
        from sage_server import backup
        from sage_server.store import open_store

        settings = _settings(ctx)
        saved = backup.restore_store(settings, backup_path, checksum=not no_checksum, force=force)
        where = open_store(settings).location
        click.echo(f"restored {where} from {backup_path}" + (f"; the previous database is at {saved}" if saved else ""))
        return
    if doc_id is None or revision is None:
        _fail("give DOC_ID REVISION (a document revision) or --backup PATH (a database backup)", 2)
    doc = run(ctx, lambda kb: kb.restore(doc_id, revision))
    emit(doc, as_json, lambda: click.echo(f"{doc.id}: revision {revision} restored as revision {doc.revision}"))


@main.command(name="backup")
@click.option(
    "--to", "backup_dir", type=click.Path(path_type=Path), default=None, help="Folder for the backup (SAGE_BACKUP_DIR)."
)
@json_option
@click.pass_context
def backup_command(ctx: click.Context, backup_dir: Path | None, as_json: bool) -> None:
    """Back up the database online (consistent while servers write), verify the copy, prune old backups. SQLite:
    a copy of the file (sage-<time>.db); PostgreSQL: an export (sage-<time>.export.jsonl.gz)."""
    from sage_server import backup

    settings = _settings(ctx)
    target = backup_dir or settings.backup_dir
    report = backup.backup_store(settings, target)
    backup.record(target, report=report)  # a manual backup counts: the schedule and /health see it
    emit(
        report,
        as_json,
        lambda: click.echo(
            f"{report.path}: {report.documents} documents, {report.bytes} bytes, sha256 {report.sha256[:16]}…; "
            f"{len(report.pruned)} old backups removed"
        ),
    )


@main.command()
@click.option("--all", "thorough", is_flag=True, help="Also check every content hash and revision chain.")
@click.option(
    "--path",
    "path",
    type=click.Path(path_type=Path),
    default=None,
    help="Verify this database, backup or export file instead of the configured store.",
)
@json_option
@click.pass_context
def verify(ctx: click.Context, thorough: bool, path: Path | None, as_json: bool) -> None:
    """Verify the database: SQLite integrity, the search indexes, migrations (--all: hashes, history); an export
    or a PostgreSQL store: checksum, format, hashes, revision chains. Exit 1 if anything is wrong."""
    from sage_server import backup

    settings = _settings(ctx)
    if path is None and settings.database_url is not None:
        report = backup.verify_live(settings)
    else:
        report = backup.verify(path or settings.db_path, thorough)

    def human() -> None:
        for check in report.checks:
            click.echo(f"{'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}")

    emit(report, as_json, human)
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("doc_id")
@json_option
@click.pass_context
def delete(ctx: click.Context, doc_id: str, as_json: bool) -> None:
    """Soft-delete a document (recoverable with `sage restore` until purged)."""
    doc = run(ctx, lambda kb: kb.delete(doc_id))
    emit(doc, as_json, lambda: click.echo(f"{doc.id}: deleted as revision {doc.revision}"))


@main.command()
@click.argument("doc_id")
@click.pass_context
def purge(ctx: click.Context, doc_id: str) -> None:
    """Remove a deleted document and its whole history for good."""
    run(ctx, lambda kb: kb.purge(doc_id))
    click.echo(f"{doc_id}: purged")


@main.command()
@click.option("--url", default=None, help="Check a running server (e.g. http://127.0.0.1:8000) instead of the store.")
@json_option
@click.pass_context
def health(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """Check the local knowledge base, or a running server with --url; exit 0 only when healthy."""
    if url:
        result = _remote_health(url.rstrip("/"))
    else:
        result = run(ctx, lambda kb: kb.health())
    emit(result, as_json, lambda: click.echo(f"{result.status} " + json.dumps(result.components)))
    if result.status != "healthy":
        sys.exit(EXIT_UNHEALTHY)


def _remote_health(url: str) -> Health:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:  # noqa: S310 - the user's URL
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503 still carries the health document
        body = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"unreachable: {url}/health ({getattr(exc, 'reason', exc)})", EXIT_UNHEALTHY)
    try:
        return Health.model_validate_json(body)
    except ValueError:
        _fail(f"{url}/health did not answer with a health document", EXIT_UNHEALTHY)


@main.group()
def keys() -> None:
    """Named API keys for HTTP clients: create, list, revoke (rotate: create a new one, switch, revoke the old)."""


@keys.command(name="create")
@click.argument("name")
@click.option(
    "--scope",
    type=click.Choice(["read", "write", "admin"]),
    required=True,
    help="read: get, search, context; write: also save, delete, restore, import; admin: also keys, audit, purge.",
)
@click.option("--expires-in", "expires_in", type=float, default=None, help="Days until the key stops working.")
@json_option
@click.pass_context
def keys_create(ctx: click.Context, name: str, scope: str, expires_in: float | None, as_json: bool) -> None:
    """Make a key called NAME and print its secret, this once (it is stored only as a digest)."""
    created = run(ctx, lambda kb: kb.create_key(name, scope, expires_in), import_first=False)

    def human() -> None:
        expiry = f", expires {created.expires_at:%Y-%m-%d %H:%M} UTC" if created.expires_at else ""
        click.echo(f"key {created.name} ({created.scope}{expiry}); its secret, shown only now:")
        click.echo(created.token)

    emit(created, as_json, human)


@keys.command(name="list")
@json_option
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """List every key with its scope and state (never a secret)."""
    listing = run(ctx, lambda kb: kb.list_keys(), import_first=False)

    def human() -> None:
        now = datetime.now(UTC)
        for key in listing.keys:
            if key.revoked_at:
                state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}"
            elif key.expires_at and key.expires_at <= now:
                state = f"expired {key.expires_at:%Y-%m-%d %H:%M}"
            else:
                state = f"active until {key.expires_at:%Y-%m-%d %H:%M}" if key.expires_at else "active"
            click.echo(f"{key.name}  {key.scope}  created {key.created_at:%Y-%m-%d %H:%M}  {state}")
        if not listing.keys:
            click.echo("no keys (sage keys create NAME --scope read|write|admin)")

    emit(listing, as_json, human)


@keys.command(name="revoke")
@click.argument("name")
@json_option
@click.pass_context
def keys_revoke(ctx: click.Context, name: str, as_json: bool) -> None:
    """Revoke the key NAME: every server sharing the database refuses it within a second."""
    revoked = run(ctx, lambda kb: kb.revoke_key(name), import_first=False)
    emit(revoked, as_json, lambda: click.echo(f"key {revoked.name} revoked"))


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(value: str | None) -> datetime | None:
    """--since as a time (2026-11-29, 2026-11-29T10:00) or an age (30m, 12h, 7d)."""
    if value is None:
        return None
    age = _DURATION.match(value.strip())
    if age:
        return datetime.now(UTC) - timedelta(seconds=float(age.group(1)) * _SECONDS[age.group(2)])
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise InvalidInput(
            f"--since must be a time (2026-11-29T10:00) or an age (30m, 12h, 7d), not {value!r}"
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@main.command(name="audit")
@click.option("--since", "since", default=None, help="Only entries from this time or age on (2026-11-29, 12h, 7d).")
@click.option("--limit", type=int, default=1000, show_default=True, help="Most entries to print.")
@json_option
@click.pass_context
def audit_command(ctx: click.Context, since: str | None, limit: int, as_json: bool) -> None:
    """Print the audit trail: who changed what, when, from where, and how it went."""
    start = _since(since)
    page = run(ctx, lambda kb: kb.audit_trail(start, 0, limit), import_first=False)

    def human() -> None:
        for e in page.entries:
            target = f" {e.target}" + (f"@{e.revision}" if e.revision is not None else "") if e.target else ""
            count = f" x{e.count}" if e.count > 1 else ""
            click.echo(f"{e.at:%Y-%m-%d %H:%M:%S}  {e.key}  {e.client}  {e.operation}{target}  {e.outcome}{count}")

    emit(page, as_json, human)


@main.group()
def config() -> None:
    """Inspect configuration."""


@config.command(name="show")
@json_option
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """Print the effective settings and where each came from (secrets masked)."""
    rows = describe(ctx.obj.loaded)
    if as_json:
        payload = {name: {"env": env, "value": value, "source": source} for name, env, value, source in rows}
        click.echo(json.dumps(payload, indent=2))
        return
    width = max(len(r[0]) for r in rows)
    for name, env, value, source in rows:
        click.echo(f"{name:<{width}}  {value}  [{source}; {env}]")


@main.command()
@click.option("--host", default=None, help="Address to bind (SAGE_HOST; 0.0.0.0 in containers).")
@click.option("--port", type=int, default=None, help="REST API port, also serving MCP at /mcp (SAGE_API_PORT).")
@click.option("--mcp-port", type=int, default=None, help="MCP port (SAGE_MCP_PORT).")
@click.option("--metrics-port", type=int, default=None, help="Prometheus metrics port (SAGE_METRICS_PORT).")
@click.option(
    "--tls-cert-file",
    type=click.Path(path_type=Path),
    default=None,
    help="PEM certificate (chain): serve every listener over HTTPS (SAGE_TLS_CERT_FILE).",
)
@click.option(
    "--tls-key-file",
    type=click.Path(path_type=Path),
    default=None,
    help="PEM private key of the certificate, if not in its file (SAGE_TLS_KEY_FILE).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str | None,
    port: int | None,
    mcp_port: int | None,
    metrics_port: int | None,
    tls_cert_file: Path | None,
    tls_key_file: Path | None,
) -> None:
    """Serve REST, /health and MCP on the API port, MCP on the MCP port, metrics on the metrics port."""
    from sage_server.serve import serve as run_server  # imported here: plain CLI commands stay quick to start

    settings = _settings(
        ctx,
        host=host,
        api_port=port,
        mcp_port=mcp_port,
        metrics_port=metrics_port,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
    )
    _run_server(settings, lambda: run_server(settings))


@main.command()
@click.option(
    "--transport",
    type=click.Choice(["stdio", "http"]),
    default="stdio",
    show_default=True,
    help="stdio for an assistant that launches SAGE; http for streamable HTTP (/mcp) and SSE (/sse).",
)
@click.option("--host", default=None, help="Address to bind with --transport http (SAGE_HOST).")
@click.option("--port", type=int, default=None, help="Port with --transport http (SAGE_MCP_PORT).")
@click.pass_context
def mcp(ctx: click.Context, transport: str, host: str | None, port: int | None) -> None:
    """Serve MCP: over stdio (stdout is the wire, logs go to stderr) or over HTTP on its own."""
    from sage_server.assistant import serve_stdio
    from sage_server.serve import serve as run_server

    settings = _settings(ctx, host=host, mcp_port=port)
    if transport == "stdio":
        _run_server(settings, lambda: serve_stdio(settings))
    else:
        _run_server(settings, lambda: run_server(settings, ("mcp",)))


def _run_server(settings: Settings, main_loop: Callable[[], Awaitable[None]]) -> None:
    from sage_server.serve import limit_malloc_arenas

    limit_malloc_arenas()
    try:
        # uvloop, where it is installed (not on Windows), serves HTTP with noticeably less CPU a request.
        anyio.run(main_loop, backend_options={"use_uvloop": importlib.util.find_spec("uvloop") is not None})
    except KeyboardInterrupt:
        pass
    finally:
        # The process ends next: spare it the cyclic garbage collection of everything the server built, which
        # took ~0.8 s of the exit after SIGTERM (nothing left needs it: the service is closed, logs are flushed).
        gc.freeze()


@main.command(name="eval")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--k", default=5, show_default=True, help="Cut-off for recall@k (1-10; MRR and nDCG look at the first 10 hits)."
)
@click.option("--max-tokens", default=4000, show_default=True, help="Budget for context queries.")
@click.option("--verbose", is_flag=True, help="Also list the queries that missed.")
@json_option
@click.pass_context
def eval_command(
    ctx: click.Context, files: tuple[Path, ...], k: int, max_tokens: int, verbose: bool, as_json: bool
) -> None:
    """Measure retrieval quality with judged queries (default: the bundled knowledge/eval.yaml)."""
    paths = list(files) or [knowledge_dir() / "eval.yaml"]

    async def action(kb: KnowledgeService) -> EvalReport:
        return await run_eval(kb, load_queries(paths), k, max_tokens)

    report = run(ctx, action)

    def human() -> None:
        if report.search_queries:  # a kind of query the file does not hold is not printed as a score of 0
            click.echo(
                f"search  ({report.search_queries} queries): recall@{k} {report.recall_at_k:.3f}  "
                f"MRR@10 {report.mrr:.3f}  nDCG@10 {report.ndcg_at_10:.3f}"
            )
        if report.context_queries:
            click.echo(
                f"context ({report.context_queries} tasks):   relevant found {report.context_hit_rate:.1%}  "
                f"budget on relevant {report.context_relevant_share:.1%}  "
                f"off-topic packed while relevant left out: {report.context_crowded_out}"
            )
        if report.out_of_scope_queries:
            rate = "n/a" if report.false_alarm_rate is None else f"{report.false_alarm_rate:.1%}"
            click.echo(
                f"out of scope ({report.out_of_scope_queries} queries): false alarms {rate} "
                f"(first hit scoring above {report.false_alarm_threshold}, what 95% of in-scope first hits reach)"
            )
        if report.kinds:
            click.echo("by kind:")
        for figures in report.kinds:
            if figures.mode == "search":
                click.echo(
                    f"  {figures.kind:<24} {figures.queries:>4} queries  recall@{k} {figures.recall_at_k:.3f}  "
                    f"MRR@10 {figures.mrr:.3f}  nDCG@10 {figures.ndcg_at_10:.3f}"
                )
            else:
                click.echo(
                    f"  {figures.kind:<24} {figures.queries:>4} tasks    relevant found "
                    f"{figures.context_hit_rate:.1%}  budget on relevant {figures.context_relevant_share:.1%}"
                )
        for outcome in report.outcomes:
            if verbose and outcome.relevant and (outcome.first_relevant_rank or 99) > 1:
                click.echo(
                    f"  rank {outcome.first_relevant_rank}  {outcome.mode:<7} {outcome.query!r} "
                    f"want {outcome.relevant} got {outcome.returned[:5]}"
                )

    emit(report, as_json, human)
