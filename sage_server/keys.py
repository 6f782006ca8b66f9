"""Named API keys with scopes, stored in the database as digests: several valid at once, so rotation is create the
new one, switch clients, revoke the old one, with no restart.

Every instance sharing the database reads the keys again when its copy is over a second old, so a revoke takes
effect within a second everywhere. Keys are few; reading them all costs one small query a second at most.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import anyio

from sage_server.audit import AuditTrail, Entry
from sage_server.auth import SCOPE_GRANTS, Principal
from sage_server.errors import Conflict, InvalidInput, NotFound, SageError, Unauthorized, Unavailable
from sage_server.logs import get_logger, log_event
from sage_server.models import ApiKey, CreatedKey
from sage_server.store import Store

log = get_logger("auth")
TOKEN_PREFIX = "sage_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Names the audit trail already gives to other callers.
RESERVED_NAMES = frozenset({"local", "anonymous", "sage_api_key", "admin.key"})
REFRESH_SECONDS = 1.0
MAX_EXPIRY_DAYS = 3650
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="sage", error="invalid_token"'}


def new_token() -> str:
    """A new secret: 256 random bits, recognisable by its prefix (secret scanners look for such prefixes)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """What is stored of a secret. A fast hash is enough: the secret is random, not a password to guess."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    """`name` if it can name a key, else InvalidInput saying why."""
    if not NAME_PATTERN.match(name):
        raise InvalidInput(
            "a key name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", field="name"
        )
    if name.lower() in RESERVED_NAMES:
        raise InvalidInput(f"{name!r} is reserved for the audit trail; choose another name", field="name")
    return name


class StoredKeys:
    """The keys in the database as a credential source for the front door. `load` reads them all."""

    label = "named keys (sage keys)"

    def __init__(
        self, load: Callable[[], Awaitable[list[tuple[ApiKey, str]]]], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._load = load
        self._clock = clock
        self._by_digest: dict[str, ApiKey] = {}
        self._loaded_at = -REFRESH_SECONDS
        self._loaded = False
        self._lock = anyio.Lock()

    @property
    def active(self) -> bool:
        # Any key ever made, revoked and expired ones too: revoking the last key must not open the door to all.
        return bool(self._by_digest)

    async def refresh(self) -> None:
        """Read the keys again when the copy held is over a second old (one reader at a time; the others wait).

        If they cannot be read, the copy held goes on serving; with none held yet, the request is refused (503)
        rather than let in as if no key existed."""
        if self._clock() - self._loaded_at < REFRESH_SECONDS:
            return
        async with self._lock:
            if self._clock() - self._loaded_at < REFRESH_SECONDS:
                return  # another request refreshed it meanwhile
            try:
                self._by_digest = {stored_digest: key for key, stored_digest in await self._load()}
            except SageError as exc:
                if not self._loaded:
                    raise Unavailable(f"the stored keys cannot be read: {exc}") from exc
                log_event(log, logging.WARNING, "Stored keys not refreshed", operation="auth", error=str(exc))
            else:
                self._loaded = True
            self._loaded_at = self._clock()

    def forget(self) -> None:
        """Make the next `refresh` read the keys (after this instance changed them)."""
        self._loaded_at = -REFRESH_SECONDS

    async def resolve(self, token: str) -> Principal | None:
        key = self._by_digest.get(digest(token))
        if key is None:
            return None
        if key.revoked_at is not None:
            raise Unauthorized(f"the key {key.name!r} was revoked", reason="revoked", key=key.name, headers=CHALLENGE)
        if key.expires_at is not None and key.expires_at <= datetime.now(UTC):
            raise Unauthorized(f"the key {key.name!r} expired", reason="expired", key=key.name, headers=CHALLENGE)
        return Principal(key.name, SCOPE_GRANTS[key.scope])


class KeyStore:
    """Make, list and revoke the keys of one database; every change is an entry in the audit trail."""

    def __init__(self, store: Store, audit: AuditTrail) -> None:
        self.store = store
        self.audit = audit

    async def load(self) -> list[tuple[ApiKey, str]]:
        """Every key with the digest of its secret (for StoredKeys)."""
        async with self.store.read() as reader:
            return [(stored.key, stored.digest) for stored in await reader.keys()]

    async def create(self, name: str, scope: str, expires_in_days: float | None = None) -> CreatedKey:
        """Make a key; its secret is in the answer and nowhere else."""
        check_name(name)
        if scope not in SCOPE_GRANTS:
            raise InvalidInput(f"scope must be one of read, write, admin, not {scope!r}", field="scope")
        if expires_in_days is not None and not 0 < expires_in_days <= MAX_EXPIRY_DAYS:
            raise InvalidInput(f"expires_in_days must be between 0 and {MAX_EXPIRY_DAYS}", field="expires_in_days")
        token = new_token()
        expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
        entry = Entry("key_create", target=name, detail={"scope": scope, "expires_at": expires})
        try:
            async with self.store.transaction() as writer:
                if not await writer.insert_key(name, digest(token), scope, expires.isoformat() if expires else None):
                    raise Conflict(f"a key named {name!r} exists (names are never reused); choose another", name=name)
                await self.audit.record(writer, entry)
        except Conflict:
            entry.outcome = "conflict"
            await self.audit.record_failure(entry)
            raise
        created = next(key for key in await self.list_keys() if key.name == name)
        return CreatedKey(**created.model_dump(), token=token)

    async def list_keys(self) -> list[ApiKey]:
        """Every key, revoked and expired ones included, oldest first."""
        return [key for key, _ in await self.load()]

    async def revoke(self, name: str) -> ApiKey:
        """Revoke a key: within a second, no instance sharing the database accepts it."""
        entry = Entry("key_revoke", target=name)
        async with self.store.transaction() as writer:
            revoked = await writer.revoke_key(name)
            entry.outcome = "ok" if revoked else "not_found"
            await self.audit.record(writer, entry)
        if not revoked:
            known = [key.name for key in await self.list_keys() if key.revoked_at is None]
            raise NotFound(f"no key named {name!r} that is not revoked already (keys: {', '.join(known) or 'none'})")
        return next(key for key in await self.list_keys() if key.name == name)
