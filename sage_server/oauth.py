"""OAuth 2.1 resource server: JWT access tokens from one external authorization server, verified against the keys it
publishes (JWKS), as one more credential source of the front door; and the RFC 9728 protected-resource metadata that
tells an MCP client which authorization server to ask for a token.

A token is accepted when its signature verifies with one of the issuer's keys (asymmetric algorithms only), `iss` is
the configured issuer, `aud` names the configured audience, and `exp` has not passed (30 s of leeway for clocks).
Its `scope` (or `scp`) claim maps `sage:read`, `sage:write` and `sage:admin` onto the key scopes; the principal is
`oauth:<sub>`, with `subject` and `issuer` set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import anyio
import anyio.to_thread
import jwt
from jwt import PyJWK, PyJWKClient, PyJWKSet
from mcp.shared.auth import ProtectedResourceMetadata
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sage_server.auth import SCOPE_GRANTS, Principal
from sage_server.config import Settings
from sage_server.errors import Unauthorized, Unavailable, clip
from sage_server.logs import get_logger, log_event

log = get_logger("auth")

SCOPES: Final = {"sage:read": "read", "sage:write": "write", "sage:admin": "admin"}
# Asymmetric only: with HS256 allowed, the issuer's public key could be used as an HMAC secret to forge tokens.
ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
LEEWAY_SECONDS: Final = 30
REQUIRED_CLAIMS: Final = ["exp", "iss", "aud", "sub"]
RESOURCE_PATH: Final = "/mcp"
METADATA_PATH: Final = "/.well-known/oauth-protected-resource" + RESOURCE_PATH
SUBJECT_LIMIT: Final = 128  # characters of `sub` kept in the principal's name (it appears in logs and metrics)

# Why a token is refused: the reason (the 401's details, the metrics, the audit trail) and what the client is told.
REFUSALS: Final = {
    "malformed_token": "the access token is not a well-formed JWT",
    "unsupported_algorithm": "the access token is signed with an algorithm this server does not accept",
    "unknown_kid": "the access token is signed with a key the issuer does not publish",
    "bad_signature": "the access token's signature does not verify",
    "expired": "the access token has expired",
    "not_yet_valid": "the access token is not valid yet",
    "wrong_audience": "the access token was issued for another audience",
    "wrong_issuer": "the access token was issued by another authorization server",
    "missing_claim": "the access token lacks a required claim (exp, iss, aud and sub are required)",
    "invalid_token": "the access token is not valid",
}


def refusal(reason: str) -> Unauthorized:
    """Unauthorized for `reason`, with the RFC 6750 challenge naming it."""
    message = REFUSALS[reason]
    challenge = f'Bearer realm="sage", error="invalid_token", error_description="{message}"'
    return Unauthorized(message, reason=reason, headers={"WWW-Authenticate": challenge})


class SigningKeys:
    """The issuer's published keys: fetched on first use, again when a token names a key that is not among them, and
    when the copy is older than `max_age` (so a key the issuer withdrew stops working). Refetches are at most one per
    `min_refetch` seconds: tokens naming made-up keys cannot make this server hammer the issuer. One fetch at a time;
    requests that need it wait for it."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        max_age: float = 3600.0,
        min_refetch: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.max_age = max_age
        self.min_refetch = min_refetch
        self.fetches = 0
        self._clock = clock
        # PyJWT's client fetches (urllib, no redirects followed) and parses; its own caches are off: ours is above.
        self._client = PyJWKClient(url, cache_keys=False, cache_jwk_set=False, timeout=timeout)
        self._keys: dict[str | None, tuple[PyJWK, str | None]] = {}  # kid -> (key, the algorithm it declares)
        self._fetched_at: float | None = None  # of the last good fetch
        self._tried_at: float | None = None  # of the last attempt, good or not
        self._lock = anyio.Lock()

    async def get(self, kid: str | None) -> tuple[PyJWK, str | None]:
        """The key a token's `kid` names (a token without one may use the issuer's only key) and the algorithm the
        key declares, if any. Unauthorized (unknown_kid) when the issuer does not publish it; Unavailable when its
        keys cannot be fetched at all."""
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self.max_age
        if stale or self._find(kid) is None:
            async with self._lock:
                now = self._clock()
                stale = self._fetched_at is None or now - self._fetched_at >= self.max_age
                may_try = self._tried_at is None or now - self._tried_at >= self.min_refetch
                if (stale or self._find(kid) is None) and may_try:
                    await self._fetch()
        key = self._find(kid)
        if key is not None:
            return key
        if self._fetched_at is None:
            raise Unavailable(f"the authorization server's keys cannot be fetched from {self.url}")
        raise refusal("unknown_kid")

    def _find(self, kid: str | None) -> tuple[PyJWK, str | None] | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if kid is not None else None

    async def _fetch(self) -> None:
        self._tried_at = self._clock()
        self.fetches += 1
        try:
            # urllib blocks: run it in a worker thread, bounded by the client's timeout.
            data = await anyio.to_thread.run_sync(self._client.fetch_data)
            keys = PyJWKSet.from_dict(data)
        except (jwt.PyJWTError, ValueError) as exc:  # unreachable, not JSON, no usable key
            log_event(
                log,
                logging.WARNING,
                "The authorization server's keys could not be fetched; the keys held are kept",
                operation="auth",
                url=self.url,
                error=clip(str(exc), 300),
                held=len(self._keys),
            )
            return
        declared = {raw.get("kid"): raw.get("alg") for raw in data["keys"] if isinstance(raw, dict)}
        usable = {key.key_id: (key, declared.get(key.key_id)) for key in keys if key.public_key_use in (None, "sig")}
        self._keys, self._fetched_at = usable, self._clock()
        log_event(
            log, logging.INFO, "Authorization server keys fetched", operation="auth", url=self.url, keys=len(usable)
        )


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """The key scopes a token's `scope` (space-separated, RFC 9068) or `scp` (a list) claim grants."""
    raw = claims.get("scope", claims.get("scp", ""))
    names = raw.split() if isinstance(raw, str) else [str(name) for name in raw] if isinstance(raw, list) else []
    granted: set[str] = set()
    for name in names:
        if name in SCOPES:
            granted |= SCOPE_GRANTS[SCOPES[name]]
    return frozenset(granted)


class OAuthIssuer:
    """A credential source for JWT access tokens from one authorization server. Tokens that are not JWTs are not its
    own (None: another source may know them); a JWT it cannot accept is refused with the reason."""

    active = True  # tokens can arrive at any time: configuring an issuer means credentials are required

    def __init__(self, issuer: str, audience: str, keys: SigningKeys) -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys = keys
        self.label = f"OAuth access tokens from {issuer}"

    def __repr__(self) -> str:
        return f"OAuthIssuer({self.issuer!r}, audience={self.audience!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> OAuthIssuer | None:
        """The issuer the settings name, if any (config validation ensures all three settings come together)."""
        if settings.oauth_issuer is None or settings.oauth_audience is None or settings.oauth_jwks_url is None:
            return None
        return cls(settings.oauth_issuer, settings.oauth_audience, SigningKeys(settings.oauth_jwks_url))

    async def refresh(self) -> None:
        """Nothing to do per request: keys are fetched when a token needs them."""

    async def resolve(self, token: str) -> Principal | None:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            return None  # not a JWT: an API key, say, that no other source knew
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise refusal("unsupported_algorithm")
        kid = header.get("kid")
        key, declared = await self.keys.get(kid if isinstance(kid, str) else None)
        if declared is not None and declared != algorithm:  # a key that names its algorithm is used with it only
            raise refusal("bad_signature")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise refusal("expired") from None
        except jwt.InvalidAudienceError:
            raise refusal("wrong_audience") from None
        except jwt.InvalidIssuerError:
            raise refusal("wrong_issuer") from None
        except jwt.InvalidSignatureError:
            raise refusal("bad_signature") from None
        except jwt.ImmatureSignatureError:
            raise refusal("not_yet_valid") from None
        except jwt.MissingRequiredClaimError:
            raise refusal("missing_claim") from None
        except jwt.DecodeError:
            raise refusal("malformed_token") from None
        except jwt.PyJWTError:  # a key that does not fit the algorithm, a malformed claim
            raise refusal("invalid_token") from None
        subject = clip(str(claims["sub"]), SUBJECT_LIMIT)
        return Principal(f"oauth:{subject}", scopes_of(claims), subject=subject, issuer=self.issuer)


# -- RFC 9728: where to get a token ---------------------------------------------------------------------------------


def base_url(scheme: str, host: str | None) -> str:
    """This server's URL as the client reached it (the scheme is https under TLS or a trusted proxy's
    X-Forwarded-Proto; the Host has passed the front door's rule)."""
    return f"{scheme}://{host or 'localhost'}"


def metadata_url(scheme: str, host: str | None) -> str:
    """Where the metadata of this server's /mcp is (RFC 9728 section 3.1), for the 401's `resource_metadata`."""
    return base_url(scheme, host) + METADATA_PATH


def metadata_route(issuer: OAuthIssuer) -> Route:
    """GET /.well-known/oauth-protected-resource/mcp: the resource (this server's /mcp as the client reached it), the
    authorization server that issues its tokens, and the scopes it understands. No credential needed, and any page
    may read it (it holds nothing secret; browser-based MCP clients fetch it cross-origin)."""

    async def metadata(request: Request) -> Response:
        # Strings, not AnyHttpUrl objects: the model keeps a path-less issuer exactly as configured (no trailing /),
        # and clients compare issuers as exact strings.
        document = ProtectedResourceMetadata.model_validate(
            {
                "resource": base_url(request.url.scheme, request.headers.get("host")) + RESOURCE_PATH,
                "authorization_servers": [issuer.issuer],
                "scopes_supported": list(SCOPES),
                "bearer_methods_supported": ["header"],
                "resource_name": "SAGE knowledge server",
            }
        )
        body = document.model_dump(mode="json", exclude_none=True)
        headers = {"Cache-Control": "public, max-age=3600", "Access-Control-Allow-Origin": "*"}
        return JSONResponse(body, headers=headers)

    return Route(METADATA_PATH, metadata, methods=["GET"])
