"""SAGE as an OAuth 2.1 resource server: JWT access tokens signed with keys made here, their JWKS served by a local
HTTP server, checked by a real server over real uvicorn (REST and MCP); RFC 9728 metadata; the 401's challenge."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sage_server.app import create_app
from sage_server.auth import admin_key_path, ensure_admin_key
from sage_server.config import Settings, load_settings
from sage_server.errors import ConfigError, NotFound, Unauthorized, Unavailable
from sage_server.oauth import METADATA_PATH, OAuthIssuer, SigningKeys, scopes_of
from sage_server.service import KnowledgeService, open_service
from tests.conftest import make_settings
from tests.listener_support import listening
from tests.mcp_support import error_text, payload, serving

pytestmark = pytest.mark.anyio
ISSUER = "https://idp.example"
AUDIENCE = "https://kb.example/mcp"
DOC = {"title": "Tokens", "layer": "practices", "body": "Short-lived and scoped."}


@dataclass
class Issuer:
    """An authorization server as far as SAGE sees one: keys that sign tokens, and the JWKS that publishes them."""

    url: str = ""
    keys: dict[str, Any] = field(default_factory=dict)  # kid -> private key
    published: list[str] = field(default_factory=list)  # the kids the JWKS lists
    fetches: int = 0
    up: bool = True

    def add_key(self, kid: str, kind: str = "rsa", publish: bool = True) -> None:
        self.keys[kid] = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if kind == "rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )
        if publish:
            self.published.append(kid)

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self.published:
            private = self.keys[kid]
            if isinstance(private, rsa.RSAPrivateKey):
                jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
                jwk["alg"] = "RS256"
            else:
                jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
                jwk["alg"] = "ES256"
            keys.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": keys}

    def token(
        self,
        scope: str = "sage:read",
        *,
        kid: str = "k1",
        sign_with: str | None = None,
        algorithm: str | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
        body.update({"scope": scope, **claims})
        body = {name: value for name, value in body.items() if value is not None}
        private = self.keys[sign_with or kid]
        chosen = algorithm or ("RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256")
        return jwt.encode(body, private, algorithm=chosen, headers={"kid": kid})


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    state = Issuer()
    state.add_key("k1")

    async def jwks(request: Request) -> Response:
        state.fetches += 1
        if not state.up:
            return JSONResponse({"error": "down"}, status_code=503)
        return JSONResponse(state.jwks())

    async with serving(Starlette(routes=[Route("/jwks", jwks)])) as base:
        state.url = f"{base}/jwks"
        yield state


def oauth_settings(tmp_path: Path, knowledge: Path, issuer: Issuer, **extra: Any) -> Settings:
    return make_settings(
        tmp_path,
        knowledge_dirs=[knowledge],
        oauth_issuer=ISSUER,
        oauth_audience=AUDIENCE,
        oauth_jwks_url=issuer.url,
        **extra,
    )


@dataclass
class Served:
    base: str
    kb: KnowledgeService


@pytest.fixture
async def served(tmp_path: Path, knowledge: Path, issuer: Issuer) -> AsyncIterator[Served]:
    settings = oauth_settings(tmp_path, knowledge, issuer)
    async with open_service(settings) as kb:
        kb.ready = True
        async with listening(create_app(settings, kb), settings) as base:
            yield Served(base, kb)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def failures(kb: KnowledgeService) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for family in kb.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "sage_auth_failures_total"
    }


# -- tokens that work -----------------------------------------------------------------------------------------------


async def test_a_read_token_reads_and_cannot_save_over_rest_or_mcp(served: Served, issuer: Issuer) -> None:
    token = issuer.token("openid sage:read")
    with anyio.fail_after(60):
        async with httpx.AsyncClient(base_url=served.base, timeout=30, headers=bearer(token)) as http:
            assert (await http.get("/v1/search", params={"q": "retry"})).status_code == 200
            refused = await http.put("/v1/knowledge/tokens", json=DOC)
            assert refused.status_code == 403 and "needs the write scope" in refused.json()["error"]["message"]
        async with httpx2.AsyncClient(headers=bearer(token)) as reader:
            async with Client(streamable_http_client(f"{served.base}/mcp", http_client=reader)) as client:
                assert payload(await client.call_tool("sage_search", {"query": "retry"}))["hits"]
                saved = await client.call_tool("sage_save_knowledge", {"id": "tokens", "title": "T", "body": "b"})
                assert saved.is_error and "needs the write scope" in error_text(saved)


async def test_a_write_token_saves_as_its_subject(served: Served, issuer: Issuer) -> None:
    token = issuer.token("sage:write", sub="bob@example.com")
    with anyio.fail_after(60):
        async with httpx2.AsyncClient(headers=bearer(token)) as writer:
            async with Client(streamable_http_client(f"{served.base}/mcp", http_client=writer)) as client:
                saved = payload(await client.call_tool("sage_save_knowledge", {"id": "tok", "title": "T", "body": "b"}))
                assert saved["revision"] == 1
        async with httpx.AsyncClient(base_url=served.base, timeout=30, headers=bearer(token)) as http:
            # write does not include admin: the audit trail is out of reach
            assert (await http.get("/v1/audit")).status_code == 403
    entries = [entry for entry in (await served.kb.audit_trail()).entries if entry.operation == "save"]
    assert [(entry.key, entry.client, entry.outcome) for entry in entries] == [
        ("oauth:bob@example.com", "127.0.0.1", "ok")
    ]
    assert issuer.fetches == 1  # the keys were fetched once and kept


async def test_an_admin_token_reads_the_audit_trail(served: Served, issuer: Issuer) -> None:
    async with httpx.AsyncClient(base_url=served.base, timeout=30) as http:
        response = await http.get("/v1/audit", headers=bearer(issuer.token("sage:admin")))
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scope": "sage:read"}, {"read"}),
        ({"scope": "openid sage:write profile"}, {"read", "write"}),
        ({"scope": "sage:admin"}, {"read", "write", "admin"}),
        ({"scp": ["sage:read", "sage:write"]}, {"read", "write"}),
        ({"scope": "read write admin sage:owner"}, set()),  # only sage: scopes mean anything here
        ({}, set()),
    ],
)
def test_token_scopes_map_onto_key_scopes(claims: dict[str, Any], scopes: set[str]) -> None:
    assert scopes_of(claims) == scopes


async def test_a_token_without_a_sage_scope_is_let_in_but_may_do_nothing(served: Served, issuer: Issuer) -> None:
    async with httpx.AsyncClient(base_url=served.base, timeout=30) as http:
        response = await http.get("/v1/info", headers=bearer(issuer.token("openid email")))
    assert response.status_code == 403 and "needs the read scope" in response.json()["error"]["message"]


# -- tokens that do not ---------------------------------------------------------------------------------------------

REFUSED: dict[str, tuple[str, Callable[[Issuer], str]]] = {
    "expired": ("expired", lambda i: i.token(exp=int(time.time()) - 120, iat=int(time.time()) - 600)),
    "wrong audience": ("wrong_audience", lambda i: i.token(aud="https://elsewhere.example/mcp")),
    "wrong issuer": ("wrong_issuer", lambda i: i.token(iss="https://evil.example")),
    "wrong signature": ("bad_signature", lambda i: i.token(kid="k1", sign_with="forger")),
    "unknown kid": ("unknown_kid", lambda i: i.token(kid="forger")),
    "not yet valid": ("not_yet_valid", lambda i: i.token(nbf=int(time.time()) + 600)),
    "no subject": ("missing_claim", lambda i: i.token(sub=None)),
    "no expiry": ("missing_claim", lambda i: i.token(exp=None)),
    "HS256 with the public key": ("unsupported_algorithm", lambda i: hs256_with_public_key(i)),
    "alg none": ("unsupported_algorithm", lambda i: jwt.encode({"sub": "x"}, "", algorithm="none")),
    "another algorithm than the key's": ("bad_signature", lambda i: i.token(algorithm="PS256")),
}


def hs256_with_public_key(issuer: Issuer) -> str:
    """The classic forgery: the issuer's public key, which anyone can fetch, used as an HMAC secret. Made by hand:
    PyJWT itself refuses to sign with such a secret."""
    secret = RSAAlgorithm.to_jwk(issuer.keys["k1"].public_key()).encode()
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": int(time.time()) + 300, "scope": "sage:admin"}
    signed = b".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=")
        for part in ({"alg": "HS256", "typ": "JWT", "kid": "k1"}, body)
    )
    signature = base64.urlsafe_b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).rstrip(b"=")
    return (signed + b"." + signature).decode()


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_bad_tokens_are_refused_naming_the_reason_and_counted(served: Served, issuer: Issuer, case: str) -> None:
    issuer.add_key("forger", publish=False)
    reason, make = REFUSED[case]
    async with httpx.AsyncClient(base_url=served.base, timeout=30) as http:
        response = await http.put("/v1/knowledge/forged", json=DOC, headers=bearer(make(issuer)))
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "unauthorized" and error["details"]["reason"] == reason
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    assert f'resource_metadata="{served.base}{METADATA_PATH}"' in challenge
    assert failures(served.kb) == {reason: 1.0}
    await served.kb.audit.flush()
    counted = [entry for entry in (await served.kb.audit_trail()).entries if entry.operation == "authenticate"]
    assert [(entry.client, entry.outcome, entry.count) for entry in counted] == [("127.0.0.1", reason, 1)]
    with pytest.raises(NotFound):
        await served.kb.get("forged")  # nothing was saved


async def test_a_request_without_a_token_is_told_where_to_get_one(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.base, timeout=30) as http:
        response = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        metadata_url = response.headers["www-authenticate"].split('resource_metadata="', 1)[1].split('"', 1)[0]
        assert response.status_code == 401 and response.json()["error"]["details"]["reason"] == "missing"
        assert metadata_url == f"{served.base}/.well-known/oauth-protected-resource/mcp"
        # What an MCP client does next: read the metadata, without a credential.
        document = (await http.get(metadata_url)).json()
    assert document == {
        "resource": f"{served.base}/mcp",
        "authorization_servers": [ISSUER],
        "scopes_supported": ["sage:read", "sage:write", "sage:admin"],
        "bearer_methods_supported": ["header"],
        "resource_name": "SAGE knowledge server",
    }


async def test_tokens_that_are_not_jwts_are_left_to_the_keys(tmp_path: Path, knowledge: Path, issuer: Issuer) -> None:
    settings = oauth_settings(tmp_path, knowledge, issuer, api_key="plain-key")
    async with open_service(settings) as kb:
        kb.ready = True
        async with listening(create_app(settings, kb), settings) as base, httpx.AsyncClient(timeout=30) as http:
            assert (await http.get(f"{base}/v1/info", headers={"X-API-Key": "plain-key"})).status_code == 200
            assert (await http.get(f"{base}/v1/info", headers=bearer(issuer.token()))).status_code == 200
            wrong = await http.get(f"{base}/v1/info", headers=bearer("not-a-key"))
            assert wrong.status_code == 401 and wrong.json()["error"]["details"]["reason"] == "invalid"
            assert "resource_metadata=" in wrong.headers["www-authenticate"]
    assert issuer.fetches == 1  # a plain key never sent anyone to the issuer


# -- the metadata document ------------------------------------------------------------------------------------------


async def test_the_metadata_is_open_to_any_page_but_names_only_this_server(
    tmp_path: Path, knowledge: Path, issuer: Issuer
) -> None:
    settings = oauth_settings(tmp_path, knowledge, issuer, rate_limit_per_minute=1)
    async with open_service(settings) as kb:
        kb.ready = True
        async with listening(create_app(settings, kb), settings) as base, httpx.AsyncClient(timeout=30) as http:
            for _ in range(3):  # never limited, never asks for a credential
                response = await http.get(f"{base}{METADATA_PATH}", headers={"Origin": "https://inspector.example"})
                assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"
            assert response.json()["resource"] == f"{base}/mcp"
            # Behind a name the operator allowed, the resource is that name.
            named = await http.get(f"{base}{METADATA_PATH}", headers={"Host": "localhost:8443"})
            assert named.json()["resource"] == "http://localhost:8443/mcp"
            foreign = await http.get(f"{base}{METADATA_PATH}", headers={"Host": "evil.example"})
            assert foreign.status_code == 421  # DNS rebinding still meets the Host rule


async def test_without_oauth_there_is_no_metadata_and_no_pointer_to_it(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], api_key="plain-key")
    async with open_service(settings) as kb:
        kb.ready = True
        async with listening(create_app(settings, kb), settings) as base, httpx.AsyncClient(timeout=30) as http:
            assert (await http.get(f"{base}{METADATA_PATH}")).status_code == 404
            refused = await http.get(f"{base}/v1/info")
            assert refused.status_code == 401 and "resource_metadata" not in refused.headers["www-authenticate"]


# -- the issuer's keys ----------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def source(issuer: Issuer, clock: Clock, **options: float) -> OAuthIssuer:
    return OAuthIssuer(ISSUER, AUDIENCE, SigningKeys(issuer.url, clock=clock, **options))


async def reason_of(oauth: OAuthIssuer, token: str) -> str:
    with pytest.raises(Unauthorized) as refused:
        await oauth.resolve(token)
    return str(refused.value.details["reason"])


async def test_a_new_key_is_fetched_when_a_token_names_it_at_most_once_per_interval(issuer: Issuer) -> None:
    clock = Clock()
    oauth = source(issuer, clock, min_refetch=30)
    assert (await oauth.resolve(issuer.token())) is not None
    assert issuer.fetches == 1
    # The issuer rotates to k2; tokens naming it (or made-up kids) arrive at once: one refetch at most per interval.
    issuer.add_key("k2", kind="ec")
    for n in range(20):
        assert (
            await reason_of(oauth, issuer.token(kid="k2" if n % 2 else f"made-up-{n}", sign_with="k2")) == "unknown_kid"
        )
    assert issuer.fetches == 1  # the last fetch was under 30 s ago
    clock.now += 31
    principal = await oauth.resolve(issuer.token("sage:write", kid="k2"))
    assert principal is not None and principal.scopes == frozenset({"read", "write"})
    assert principal.name == "oauth:alice" and principal.subject == "alice" and principal.issuer == ISSUER
    assert issuer.fetches == 2
    clock.now += 31
    for n in range(20):
        await reason_of(oauth, issuer.token(kid=f"made-up-again-{n}", sign_with="k1"))
    assert issuer.fetches == 3  # one more for the first unknown kid after the interval, none for the rest


async def test_keys_are_fetched_again_when_old_and_kept_if_the_issuer_is_down(issuer: Issuer) -> None:
    clock = Clock()
    oauth = source(issuer, clock, max_age=3600, min_refetch=30)
    assert await oauth.resolve(issuer.token()) is not None
    issuer.up = False
    clock.now += 3601
    assert await oauth.resolve(issuer.token()) is not None  # the copy held goes on serving
    assert issuer.fetches == 2
    # The issuer withdraws k1 (it leaked, say): once the copy is refreshed, k1's tokens stop working.
    issuer.up = True
    issuer.add_key("k2")
    issuer.published.remove("k1")
    clock.now += 3601
    assert await reason_of(oauth, issuer.token()) == "unknown_kid"
    assert await oauth.resolve(issuer.token(kid="k2")) is not None


async def test_an_unreachable_issuer_is_503_not_a_bad_token(issuer: Issuer) -> None:
    issuer.up = False
    oauth = source(issuer, Clock())
    with pytest.raises(Unavailable, match="cannot be fetched"):
        await oauth.resolve(issuer.token())


async def test_concurrent_tokens_share_one_fetch(issuer: Issuer) -> None:
    oauth = source(issuer, Clock())
    tokens = [issuer.token(sub=f"user-{n}") for n in range(10)]
    names: list[str] = []

    async def check(token: str) -> None:
        principal = await oauth.resolve(token)
        assert principal is not None
        names.append(principal.name)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for token in tokens:
                tg.start_soon(check, token)
    assert sorted(names) == sorted(f"oauth:user-{n}" for n in range(10)) and issuer.fetches == 1


# -- settings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"SAGE_OAUTH_ISSUER": ISSUER}, "missing oauth_audience, oauth_jwks_url"),
        (
            {"SAGE_OAUTH_ISSUER": ISSUER, "SAGE_OAUTH_AUDIENCE": AUDIENCE, "SAGE_OAUTH_JWKS_URL": "http://idp/jwks"},
            "must be https",
        ),
        ({"SAGE_OAUTH_JWKS_URL": "file:///etc/passwd"}, "must be an http(s) URL"),
    ],
)
def test_oauth_settings_come_together_and_keys_come_over_https(
    tmp_path: Path, env: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ=env, cwd=tmp_path, home=tmp_path)
    assert problem in str(refused.value)


def test_oauth_counts_as_a_credential_so_no_admin_key_is_generated(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        host="0.0.0.0",
        oauth_issuer=ISSUER,
        oauth_audience=AUDIENCE,
        oauth_jwks_url="https://idp.example/jwks",
    )
    ensure_admin_key(settings)
    assert not admin_key_path(settings).exists()


@pytest.mark.parametrize(("proxies", "scheme"), [([], "http"), (["127.0.0.1"], "https")], ids=["untrusted", "trusted"])
async def test_behind_a_trusted_tls_proxy_the_resource_is_https(
    tmp_path: Path, knowledge: Path, issuer: Issuer, proxies: list[str], scheme: str
) -> None:
    settings = oauth_settings(tmp_path, knowledge, issuer, trusted_proxies=proxies, allowed_hosts=["kb.example.com"])
    forwarded = {"Host": "kb.example.com", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.5"}
    async with open_service(settings) as kb:
        kb.ready = True
        async with listening(create_app(settings, kb), settings) as base, httpx.AsyncClient(timeout=30) as http:
            document = (await http.get(f"{base}{METADATA_PATH}", headers=forwarded)).json()
            refused = await http.get(f"{base}/v1/info", headers=forwarded)
    assert document["resource"] == f"{scheme}://kb.example.com/mcp"
    expected = f'resource_metadata="{scheme}://kb.example.com/.well-known/oauth-protected-resource/mcp"'
    assert expected in refused.headers["www-authenticate"]
