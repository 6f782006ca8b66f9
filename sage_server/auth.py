"""Who is calling: one authentication rule for every HTTP route on every listener (REST, /mcp, /sse), and the
caller every operation acts for.

A request presents at most one credential, `Authorization: Bearer <token>` or `X-API-Key: <token>`. An
`Authenticator` asks its credential sources, in order, whom the token names, and answers a `Principal` (a name
and scopes) or refuses with `Unauthorized` and a reason. The sources are SAGE_API_KEY, the admin key `sage serve`
generates, the named keys stored in the database (keys.py), and an OAuth authorization server's JWT access tokens
(oauth.py), all behind the same `CredentialSource` protocol. stdio, the command line and in-process use never pass
through here: whoever launched the process already owns it, and acts as the `local` principal with every scope.

The front door leaves the caller (principal and client address) in a context variable for the length of the
request; the service reads it to check scopes and to name the caller in the audit trail.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sage_server.config import Settings
from sage_server.errors import ConfigError, Unauthorized
from sage_server.logs import get_logger, log_event

log = get_logger("auth")

READ, WRITE, ADMIN = "read", "write", "admin"
ALL_SCOPES = frozenset({READ, WRITE, ADMIN})
# A key's scope and what it grants: each includes the ones before it.
SCOPE_GRANTS = {READ: frozenset({READ}), WRITE: frozenset({READ, WRITE}), ADMIN: ALL_SCOPES}
ADMIN_KEY_FILE = "admin.key"
LOOPBACK_NAMES = ("localhost", "localhost.")


@dataclass(frozen=True)
class Principal:
    """Whom a request acts for: a name fit for logs (never a secret) and the scopes it holds.

    `subject` and `issuer` identify an OAuth token's owner; keys leave them empty.
    """

    name: str
    scopes: frozenset[str] = ALL_SCOPES
    anonymous: bool = False
    subject: str | None = None
    issuer: str | None = None

    def allows(self, scope: str) -> bool:
        """Whether this principal holds `scope` (read, write, admin)."""
        return scope in self.scopes


ANONYMOUS = Principal("anonymous", ALL_SCOPES, anonymous=True)
# SAGE_ALLOW_ANONYMOUS=true once credentials exist: requests without one may read.
ANONYMOUS_READER = Principal("anonymous", SCOPE_GRANTS[READ], anonymous=True)
# The command line, stdio and in-process use: whoever started the process.
LOCAL = Principal("local")


@dataclass(frozen=True)
class Caller:
    """Who an operation acts for, and from where (an address, or 'local')."""

    principal: Principal
    client: str


LOCAL_CALLER = Caller(LOCAL, "local")
_CALLER: ContextVar[Caller | None] = ContextVar("sage_caller", default=None)


def current_caller() -> Caller:
    """The caller of the operation running now (the `local` principal outside any request)."""
    return _CALLER.get() or LOCAL_CALLER


@contextmanager
def acting_as(caller: Caller) -> Iterator[None]:
    """Run the enclosed operations on behalf of `caller`."""
    token = _CALLER.set(caller)  # a frozen dataclass: nothing shared can change under another task
    try:
        yield
    finally:
        _CALLER.reset(token)


class CredentialSource(Protocol):
    """Something that can tell whom a presented token names: a configured key, a key store, an OAuth issuer."""

    @property
    def label(self) -> str:
        """What the source is, for the startup log (e.g. 'SAGE_API_KEY'); never the secret."""
        ...

    @property
    def active(self) -> bool:
        """Whether the source holds any credential now (a key store with no usable key does not)."""
        ...

    async def refresh(self) -> None:
        """Bring the source up to date before a request is authenticated (a no-op for fixed keys)."""
        ...

    async def resolve(self, token: str) -> Principal | None:
        """The principal `token` names, or None when it is not one of this source's. A token that is this source's
        but no longer good (expired, revoked) raises Unauthorized with its reason."""
        ...


def _digest(secret: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of the secret's length too.
    return hashlib.sha256(secret.encode()).digest()


class StaticKey:
    """One fixed key: SAGE_API_KEY or the generated admin key. It names one principal (an admin by default)."""

    active = True

    def __init__(self, label: str, secret: str, principal: Principal = Principal("admin")) -> None:
        self.label = label
        self.principal = principal
        self._digest = _digest(secret)  # the secret itself is not kept

    def __repr__(self) -> str:
        return f"StaticKey({self.label!r}, principal={self.principal.name!r})"

    async def refresh(self) -> None:
        """A fixed key never changes."""

    async def resolve(self, token: str) -> Principal | None:
        return self.principal if hmac.compare_digest(_digest(token), self._digest) else None


def presented_token(headers: Mapping[str, str]) -> str | None:
    """The credential a request carries: the token of `Authorization: Bearer <token>` (any spacing), else the value
    of `X-API-Key`. Raises Unauthorized (reason `unsupported_scheme`) for another Authorization scheme without an
    X-API-Key to fall back on."""
    scheme, token = [*(headers.get("authorization") or "").split(None, 1), "", ""][:2]
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = (headers.get("x-api-key") or "").strip()
    if api_key:
        return api_key
    if scheme and scheme.lower() != "bearer":
        raise Unauthorized(
            "only Bearer tokens and X-API-Key are accepted",
            reason="unsupported_scheme",
            headers={"WWW-Authenticate": 'Bearer realm="sage"'},
        )
    return None


class Authenticator:
    """The one rule: while no credential exists, every request is anonymous (with every scope, as on a laptop);
    once any does, a request must present a credential that a source resolves, unless `allow_anonymous`, which
    lets requests without one read."""

    def __init__(
        self, sources: Sequence[CredentialSource], *, allow_anonymous: bool = False, oauth: bool = False
    ) -> None:
        self.sources = list(sources)
        self.allow_anonymous = allow_anonymous
        # An OAuth issuer is among the sources: a 401 tells MCP clients where to get a token (resource_metadata).
        self.oauth = oauth

    @classmethod
    def from_settings(cls, settings: Settings, stored: CredentialSource | None = None) -> Authenticator:
        """SAGE_API_KEY, the admin key `sage serve` generated in the data folder, the `stored` keys, and the OAuth
        issuer the settings name (its tokens are JWTs, which no key is: it is asked last)."""
        from sage_server.oauth import OAuthIssuer  # oauth.py builds on this module's Principal and scopes

        sources: list[CredentialSource] = []
        if settings.api_key is not None and settings.api_key.get_secret_value().strip():
            principal = Principal("SAGE_API_KEY")
            sources.append(StaticKey("SAGE_API_KEY", settings.api_key.get_secret_value().strip(), principal))
        generated = read_admin_key(settings)
        if generated is not None:
            path = admin_key_path(settings)
            sources.append(StaticKey(f"the generated key in {path}", generated, Principal(ADMIN_KEY_FILE)))
        if stored is not None:
            sources.append(stored)
        issuer = OAuthIssuer.from_settings(settings)
        if issuer is not None:
            sources.append(issuer)
        return cls(sources, allow_anonymous=settings.allow_anonymous, oauth=issuer is not None)

    @property
    def required(self) -> bool:
        """Whether a credential exists, so requests must present one (or be anonymous readers, if allowed)."""
        return any(source.active for source in self.sources)

    def describe(self) -> str:
        """The rule in force, for the startup log."""
        active = [source.label for source in self.sources if source.active]
        if not active:
            return "none: every HTTP request is served without a credential"
        anonymous = "; requests without one may read (SAGE_ALLOW_ANONYMOUS)" if self.allow_anonymous else ""
        return "required: " + ", ".join(active) + anonymous

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The principal a request acts for, or Unauthorized (details: reason) with a WWW-Authenticate challenge."""
        for source in self.sources:
            await source.refresh()
        if not self.required:
            return ANONYMOUS
        token = presented_token(headers)
        if token is None:
            if self.allow_anonymous:
                return ANONYMOUS_READER
            raise Unauthorized(
                "a credential is required: send Authorization: Bearer <key> or X-API-Key: <key>",
                reason="missing",
                headers={"WWW-Authenticate": 'Bearer realm="sage"'},
            )
        for source in self.sources:
            principal = await source.resolve(token)
            if principal is not None:
                return principal
        raise Unauthorized(
            "the credential presented is not valid",
            reason="invalid",
            headers={"WWW-Authenticate": 'Bearer realm="sage", error="invalid_token"'},
        )


def with_resource_metadata(refused: Unauthorized, url: str) -> None:
    """Make `refused`'s challenge name the protected-resource metadata at `url`, as MCP's authorization
    specification asks of a server that takes OAuth tokens: `WWW-Authenticate: Bearer ..., resource_metadata="..."`."""
    challenge = refused.headers.get("WWW-Authenticate") or 'Bearer realm="sage"'
    refused.headers = {**refused.headers, "WWW-Authenticate": f'{challenge}, resource_metadata="{url}"'}


# -- secure by default: the admin key `sage serve` generates ---------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether binding `host` reaches only this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a name other than localhost, or an empty/wildcard address: reachable from elsewhere


def admin_key_path(settings: Settings) -> Path:
    """Where the generated admin key lives: beside the database, in the data folder."""
    return settings.db_path.parent / ADMIN_KEY_FILE


def read_admin_key(settings: Settings) -> str | None:
    """The generated admin key, if `sage serve` made one."""
    path = admin_key_path(settings)
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{path}: cannot read the generated admin key ({exc}); fix its permissions or remove it"
        ) from exc
    return key or None


def ensure_admin_key(settings: Settings, stored_keys: bool = False) -> None:
    """Secure by default: serving HTTP beyond loopback with no credential configured generates an admin key, kept
    in the data folder (owner-only) and printed once to the log. SAGE_ALLOW_ANONYMOUS=true opts out, loudly."""
    has_key = settings.api_key is not None and bool(settings.api_key.get_secret_value().strip())
    existing = read_admin_key(settings)
    if is_loopback(settings.host) or has_key or existing or stored_keys or settings.oauth_issuer:
        return
    if settings.allow_anonymous:
        log_event(
            log,
            logging.WARNING,
            f"Serving HTTP on {settings.host} without any credential (SAGE_ALLOW_ANONYMOUS=true): anyone who can "
            "reach this address can read and change the knowledge base",
            operation="auth",
            host=settings.host,
        )
        return
    path = admin_key_path(settings)
    key = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never overwrite a key another process wrote meanwhile; 0600: readable by its owner only.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if isinstance(exc, FileExistsError) and path.is_file():
            return  # another server sharing the folder generated it meanwhile
        raise ConfigError(
            f"{path}: cannot store a generated admin key ({exc.strerror}); set SAGE_API_KEY, or "
            "SAGE_ALLOW_ANONYMOUS=true to serve without a credential"
        ) from exc
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(key + "\n")
    # Printed this once (as Jupyter and Grafana do); afterwards it is only in the file.
    log_event(
        log,
        logging.WARNING,
        f"Generated an admin key for HTTP clients, shown only this once: {key} "
        f"(kept in {path}; send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'; set SAGE_API_KEY to "
        "choose your own, or SAGE_ALLOW_ANONYMOUS=true to serve without one)",
        operation="auth",
        path=str(path),
    )
