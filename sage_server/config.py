"""Settings: read once, in layers, validated, and remembered with where each value came from."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from sage_server.errors import ConfigError

DEFAULT_LAYERS = ["core", "guidelines", "frameworks", "practices", "scenarios", "templates"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
ENV_PREFIX = "SAGE_"


def _home() -> Path:
    return Path(os.path.expanduser("~"))


class Settings(BaseModel):
    """Every setting SAGE reads. The env var for a field is `SAGE_` + its name in upper case."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config_path: Path = Field(Path("sage.yaml"), description="Project config file (SAGE_CONFIG_PATH)")
    log_level: LogLevel = Field("INFO", description="Logging level")
    debug: bool = Field(False, description="Debug mode: tracebacks on errors")
    cache_dir: Path = Field(default_factory=lambda: _home() / ".sage" / "cache", description="Cache directory")
    db_path: Path = Field(default_factory=lambda: _home() / ".sage" / "sage.db", description="SQLite database file")
    database_url: SecretStr | None = Field(
        None,
        description="A PostgreSQL database to use instead of the SQLite file, shared by every instance, e.g. "
        "postgresql://sage@db.internal/sage (unset: SQLite at db_path)",
    )
    database_pool_size: int = Field(10, ge=1, le=500, description="Most PostgreSQL connections one instance opens")
    backup_dir: Path = Field(default_factory=lambda: _home() / ".sage" / "backups", description="Where backups go")
    backup_retention_days: int = Field(90, ge=1, description="Backups older than this are removed")
    backup_interval_hours: float = Field(24, ge=0, description="sage serve backs up this often (0: never)")
    knowledge_dirs: list[Path] = Field(default_factory=list, description="Extra Markdown folders to import")
    bundled_knowledge: bool = Field(True, description="Import the bundled knowledge/ on start")
    import_on_start: bool = Field(True, description="Import knowledge folders when the service opens")
    layers: list[str] = Field(default_factory=lambda: list(DEFAULT_LAYERS), description="Known layers, in order")
    default_layer: str = Field("practices", description="Layer for files outside a layer folder")
    max_file_bytes: int = Field(1_000_000, ge=1024, description="Largest Markdown file imported")
    context_max_tokens: int = Field(4000, ge=200, le=100_000, description="Default token budget for context")
    host: str = Field("127.0.0.1", description="Address the HTTP listeners bind")
    api_port: int = Field(8000, ge=0, le=65535, description="REST API port")
    mcp_port: int = Field(8001, ge=0, le=65535, description="MCP HTTP port")
    metrics_port: int = Field(9000, ge=0, le=65535, description="Prometheus metrics port")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics listener binds (loopback unless told)")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Extra Host names every HTTP route but the probes accepts ('*': any), e.g. kb.internal",
    )
    api_key: SecretStr | None = Field(None, description="API key for HTTP clients")
    allow_anonymous: bool = Field(
        False,
        description="Requests without a credential may read once keys exist; beyond loopback with none, serve "
        "without one instead of generating an admin key",
    )
    audit_retention_days: int = Field(
        365, ge=1, description="Audit entries older than this are removed (the trail is also in every backup)"
    )
    max_filters: int = Field(50, ge=1, le=1000, description="Most tag (or layer) filters one query may carry")
    rate_limit_per_minute: int = Field(
        0,
        ge=0,
        description="HTTP requests one key (one client address without a key) may make in any minute, shared by "
        "every instance through redis_url (0: no limit)",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are "
        "believed (none: forwarded headers are ignored), e.g. 10.0.0.5, 10.1.0.0/16",
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate (chain): every listener serves HTTPS")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file (if not in that file)")
    oauth_issuer: str | None = Field(
        None, description="Accept OAuth 2.1 JWT access tokens from this authorization server (its issuer id)"
    )
    oauth_audience: str | None = Field(None, description="The audience tokens must be issued for (aud)")
    oauth_jwks_url: str | None = Field(None, description="Where the issuer publishes its signing keys (JWKS)")
    redis_url: str | None = Field(None, description="Redis URL for the shared cache tier")
    cache_memory: bool = Field(True, description="Use the in-process memory cache tier")
    cache_memory_entries: int = Field(2048, ge=1, description="Most entries the memory tier holds")
    cache_memory_bytes: int = Field(64 * 2**20, ge=1024, description="Most value bytes the memory tier holds")
    cache_disk: bool = Field(True, description="Use the disk cache tier under cache_dir")
    cache_disk_bytes: int = Field(512 * 2**20, ge=1024, description="Most bytes the disk tier keeps (LRU eviction)")
    cache_disk_entries: int = Field(
        20_000, ge=1, description="Most entries the disk tier keeps (its index is held in memory)"
    )
    cache_redis: bool = Field(True, description="Use the Redis cache tier when redis_url is set")
    context_memo_entries: int = Field(
        256,
        ge=1,
        description="Most tasks whose ranked candidate sections are kept in memory, to pack them again at "
        "another budget without ranking again",
    )
    context_memo_bytes: int = Field(
        16 * 2**20, ge=1024, description="Most bytes of section text those kept tasks hold together"
    )
    sqlite_cache_mb: int = Field(
        64,
        ge=8,
        le=65_536,
        description="SQLite page cache of all connections together: half the writer's, half shared by the readers",
    )
    sqlite_readers: int = Field(
        0, ge=0, le=64, description="SQLite reader connections (0: two per CPU core, at least 3 and at most 16)"
    )
    cache_namespace: str = Field(
        "sage", min_length=1, description="Prefix of Redis keys and channels; one per knowledge base sharing a Redis"
    )
    cache_ttl_seconds: int = Field(3600, ge=1, description="Lifetime of a cache entry in every tier")
    timeout_cache_ms: int = Field(100, ge=1, description="Deadline for one cache lookup across all tiers")
    timeout_read_ms: int = Field(500, ge=1, description="Deadline for reading one document")
    timeout_search_ms: int = Field(2000, ge=1, description="Deadline for a search")
    timeout_context_ms: int = Field(5000, ge=1, description="Deadline for context packing or a full load")
    timeout_complex_ms: int = Field(10_000, ge=1, description="Deadline for a write (save, delete, restore, purge)")
    breaker_failures: int = Field(5, ge=1, description="Consecutive dependency faults that open a circuit breaker")
    breaker_reset_seconds: float = Field(
        30.0, gt=0, description="Seconds an open circuit breaker waits before one probe call"
    )
    max_requests_in_flight: int = Field(
        100, ge=1, description="HTTP requests served at once (API and MCP listeners together); 503 past it"
    )
    idle_timeout_seconds: int = Field(5, ge=1, description="A connection that sends nothing this long is closed")
    header_timeout_seconds: int = Field(
        10, ge=1, description="A request's line and headers must arrive within this long of its first byte (408)"
    )
    body_timeout_seconds: int = Field(
        30, ge=1, description="A request's body must arrive within this long after its headers (408)"
    )
    max_header_bytes: int = Field(65_536, ge=1024, description="Largest request line and headers accepted (431)")
    instance_name: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9-]{0,31}$",
        description="This instance's name behind a load balancer: MCP session ids carry it, so a balancer can route "
        "each session to the instance holding it",
    )
    mcp_session_idle_seconds: int = Field(
        300, ge=1, description="An MCP session (2025-11-25 handshake) with no request this long is closed"
    )
    mcp_max_sessions: int = Field(
        500, ge=1, description="Live MCP sessions per listener; at the cap the oldest idle one is closed"
    )
    mcp_cache_ttl_seconds: int = Field(
        60,
        ge=0,
        description="How long an MCP client may reuse a resource or the resource list (ttlMs); watchers hear sooner",
    )
    mcp_catalog_ttl_seconds: int = Field(
        300, ge=0, description="How long an MCP client may reuse the tool, prompt and resource template lists (ttlMs)"
    )
    mcp_confirm_destructive: Literal["ask", "require", "never"] = Field(
        "ask",
        description="Ask the user before an MCP delete or restore where the client can (ask); also refuse clients "
        "that cannot (require); or never ask",
    )
    shutdown_grace_seconds: int = Field(
        10, ge=0, description="On SIGTERM/SIGINT, requests in flight get this long to finish"
    )

    @field_validator("layers")
    @classmethod
    def _layers_valid(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one layer is required")
        for layer in value:
            if not layer.isidentifier() or layer != layer.lower():
                raise ValueError(f"layer {layer!r} must be a lower-case word")
        if len(set(value)) != len(value):
            raise ValueError("layers must be unique")
        return value

    @field_validator("cache_dir", "db_path", "config_path", "backup_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("tls_cert_file", "tls_key_file")
    @classmethod
    def _expand_optional(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_valid(cls, value: list[str]) -> list[str]:
        normalized = []
        for entry in value:
            try:
                # Normalized (10.1.2.0/16 -> 10.1.0.0/16): uvicorn would take a network it cannot parse for a name.
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or network (e.g. 10.0.0.5 or 10.1.0.0/16); to trust every "
                    "peer, say 0.0.0.0/0 and ::/0"
                ) from None
            normalized.append(str(network) if "/" in entry else str(network.network_address))
        return normalized

    @field_validator("database_url")
    @classmethod
    def _database_url_valid(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        if urlsplit(value.get_secret_value()).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL (unset it to use the SQLite file at db_path)")
        return value

    @field_validator("oauth_issuer", "oauth_audience", "oauth_jwks_url")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("oauth_jwks_url")
    @classmethod
    def _jwks_url_valid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL")
        host = parts.hostname.lower()
        loopback = host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)
        if parts.scheme == "http" and not loopback:
            # Keys fetched in the clear could be swapped on the way: anyone on the path could then mint tokens.
            raise ValueError("must be https (plain http only to this machine)")
        return value

    @model_validator(mode="after")
    def _together(self) -> Settings:
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_key_file needs tls_cert_file (the certificate it belongs to)")
        oauth = ("oauth_issuer", "oauth_audience", "oauth_jwks_url")
        missing = [name for name in oauth if getattr(self, name) is None]
        if 0 < len(missing) < len(oauth):
            raise ValueError(f"OAuth needs {', '.join(oauth)} together; missing {', '.join(missing)}")
        return self

    @field_validator("knowledge_dirs")
    @classmethod
    def _expand_all(cls, value: list[Path]) -> list[Path]:
        return [p.expanduser() for p in value]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


SECRET_FIELDS = {"api_key", "redis_url", "database_url"}
LIST_FIELDS = {"knowledge_dirs", "layers", "allowed_hosts", "trusted_proxies"}


class LoadedSettings(BaseModel):
    """Settings plus, for each field, the layer that set it (for `sage config show`)."""

    settings: Settings
    sources: dict[str, str]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def _env_list(name: str, field: str, raw: str) -> list[str]:
    """A list variable: separated like PATH for folders (':' here), by commas otherwise, or written as a JSON list
    (`["/a", "/b"]`, the form a JSON config file such as an assistant's MCP settings invites)."""
    if raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}: not a valid JSON list ({exc.msg} at character {exc.pos})") from exc
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"{name}: a JSON list must hold strings only")
        return [item.strip() for item in items if item.strip()]
    sep = os.pathsep if field == "knowledge_dirs" else ","
    return [part.strip() for part in raw.split(sep) if part.strip()]


def _from_env_style(values: Mapping[str, str | None]) -> dict[str, Any]:
    """Pick `SAGE_*` names out of an environment-like mapping and turn them into field values."""
    out: dict[str, Any] = {}
    for name, raw in values.items():
        if not name.startswith(ENV_PREFIX) or raw is None:
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field not in Settings.model_fields:
            continue
        if field in LIST_FIELDS:
            out[field] = _env_list(name, field, raw)
        else:
            out[field] = raw
    return out


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
) -> LoadedSettings:
    """Merge defaults, ~/.sage/config.yaml, sage.yaml (or SAGE_CONFIG_PATH), .env, SAGE_* env and overrides.

    Later layers win. A malformed file or a bad value raises ConfigError naming the file and key.
    """
    env = dict(os.environ if environ is None else environ)
    cwd = cwd or Path.cwd()
    home = home or _home()
    dotenv_path = cwd / ".env"
    dotenv = _from_env_style(dotenv_values(dotenv_path)) if dotenv_path.is_file() else {}
    env_values = _from_env_style(env)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}

    # The project file's own location can come from any later layer.
    config_path = Path(
        flags.get("config_path") or env_values.get("config_path") or dotenv.get("config_path") or "sage.yaml"
    ).expanduser()
    if not config_path.is_absolute():
        config_path = cwd / config_path
    explicit = any("config_path" in layer for layer in (flags, env_values, dotenv))
    if explicit and not config_path.is_file():
        raise ConfigError(f"{config_path}: config file named by SAGE_CONFIG_PATH/--config does not exist")

    layers: list[tuple[str, dict[str, Any]]] = []
    user_file = home / ".sage" / "config.yaml"
    if user_file.is_file():
        layers.append((str(user_file), _read_yaml(user_file)))
    if config_path.is_file():
        layers.append((str(config_path), _read_yaml(config_path)))
    layers += [(str(dotenv_path), dotenv), ("environment", env_values), ("command line", flags)]

    # Paths under the home folder are defaults too, resolved against the `home` given (tests pass their own).
    merged: dict[str, Any] = {
        "cache_dir": home / ".sage" / "cache",
        "db_path": home / ".sage" / "sage.db",
        "backup_dir": home / ".sage" / "backups",
    }
    sources: dict[str, str] = {}
    for source, values in layers:
        for key, value in values.items():
            if key not in Settings.model_fields:
                raise ConfigError(f"{source}: unknown setting {key!r} (known: {', '.join(Settings.model_fields)})")
            merged[key] = value
            sources[key] = source
    merged["config_path"] = config_path
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a rule across settings: its message names them (the input would be every value)
            raise ConfigError(f"settings: {first['msg'].removeprefix('Value error, ')}") from exc
        key = str(first["loc"][0])
        source = sources.get(key, "defaults")
        where = f"SAGE_{key.upper()}" if source == "environment" else source
        raise ConfigError(f"{where}: setting {key!r}: {first['msg']} (got {first.get('input')!r})") from exc
    all_sources = {name: sources.get(name, "default") for name in Settings.model_fields}
    return LoadedSettings(settings=settings, sources=all_sources)


def config_files(settings: Settings, cwd: Path | None = None, home: Path | None = None) -> list[Path]:
    """The configuration files SAGE reads, whether they exist or not: the user's, the project's, and .env."""
    return [(home or _home()) / ".sage" / "config.yaml", settings.config_path, (cwd or Path.cwd()) / ".env"]


def describe(loaded: LoadedSettings) -> list[tuple[str, str, str, str]]:
    """Rows of (setting, env var, effective value, source), secrets masked."""
    rows = []
    for name in Settings.model_fields:
        value = getattr(loaded.settings, name)
        if name in SECRET_FIELDS and value is not None:
            shown = "********"
        elif isinstance(value, list):
            shown = ", ".join(str(v) for v in value) or "(none)"
        else:
            shown = "(none)" if value is None else str(value)
        rows.append((name, f"SAGE_{name.upper()}", shown, loaded.sources[name]))
    return rows
