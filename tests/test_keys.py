"""Named API keys with scopes and rotation, and the durable audit trail: over REST, over MCP on real HTTP, across
instances sharing one database, through a restore, and from the command line."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from prometheus_client.parser import text_string_to_metric_families

from sage_server import backup
from sage_server.app import create_app
from sage_server.auth import admin_key_path, ensure_admin_key
from sage_server.config import Settings
from sage_server.errors import Conflict, InvalidInput
from sage_server.keys import StoredKeys
from sage_server.models import ApiKey, AuditEntry, DocumentIn
from sage_server.service import KnowledgeService, open_service
from tests.conftest import make_settings, sage_env, sage_runner, sqlite_db
from tests.mcp_support import error_text, payload, serving

pytestmark = pytest.mark.anyio


@pytest.fixture
async def kb(settings: Settings) -> AsyncIterator[KnowledgeService]:
    async with open_service(settings) as service:
        service.ready = True
        yield service


@pytest.fixture
async def tokens(kb: KnowledgeService) -> dict[str, str]:
    return {scope: (await kb.create_key(f"{scope}-key", scope)).token for scope in ("read", "write", "admin")}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def trail(kb: KnowledgeService, **match: object) -> list[AuditEntry]:
    entries = (await kb.audit_trail(limit=1000)).entries
    return [e for e in entries if all(getattr(e, name) == value for name, value in match.items())]


# -- keys -------------------------------------------------------------------------------------------------------


async def test_a_key_is_shown_once_and_stored_as_a_digest(kb: KnowledgeService) -> None:
    created = await kb.create_key("ci", "write", expires_in_days=30)
    assert created.token.startswith("sage_") and len(created.token) > 40
    assert created.expires_at is not None and created.expires_at > datetime.now(UTC) + timedelta(days=29)
    listed = (await kb.list_keys()).keys
    assert [(k.name, k.scope) for k in listed] == [("ci", "write")]
    assert created.token not in listed[0].model_dump_json()
    async with sqlite_db(kb).read() as conn:
        async with conn.execute("SELECT * FROM api_keys") as cursor:
            stored = [tuple(row) for row in await cursor.fetchall()]
    assert created.token not in repr(stored)


async def test_key_names_are_checked_and_never_reused(kb: KnowledgeService) -> None:
    await kb.create_key("ci", "read")
    await kb.revoke_key("ci")
    with pytest.raises(Conflict, match="never reused"):
        await kb.create_key("ci", "read")
    for bad in ("local", "anonymous", "has space", ""):
        with pytest.raises(InvalidInput):
            await kb.create_key(bad, "read")
    with pytest.raises(InvalidInput, match="scope"):
        await kb.create_key("other", "owner")


@pytest.fixture
async def http(kb: KnowledgeService, tokens: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(kb.settings, kb)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            yield client


DOC = {"title": "Rate Limits", "layer": "practices", "body": "Token buckets."}


async def test_scopes_over_rest(http: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    assert (await http.get("/v1/info")).status_code == 401  # once a key exists, every request needs one
    read, write, admin = (bearer(tokens[s]) for s in ("read", "write", "admin"))
    assert (await http.get("/v1/search", params={"q": "retry"}, headers=read)).status_code == 200
    refused = await http.put("/v1/knowledge/rate-limits", json=DOC, headers=read)
    assert refused.status_code == 403
    assert "needs the write scope" in refused.json()["error"]["message"]
    assert 'error="insufficient_scope", scope="write"' in refused.headers["www-authenticate"]
    assert (await http.put("/v1/knowledge/rate-limits", json=DOC, headers=write)).status_code == 201
    assert (await http.post("/v1/knowledge/rate-limits/restore", json={"revision": 1}, headers=read)).status_code == 403
    assert (await http.delete("/v1/knowledge/rate-limits", headers=write)).status_code == 200
    assert (await http.get("/v1/audit", headers=write)).status_code == 403
    audit = await http.get("/v1/audit", headers=admin)
    assert audit.status_code == 200
    assert [(e["operation"], e["key"]) for e in audit.json()["entries"] if e["target"] == "rate-limits"] == [
        ("save", "read-key"),
        ("save", "write-key"),
        ("restore", "read-key"),
        ("delete", "write-key"),
    ]


async def test_anonymous_readers_when_allowed(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], allow_anonymous=True)
    async with open_service(settings) as kb:
        await kb.create_key("admin", "admin")
        app = create_app(settings, kb)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
                assert (await client.get("/v1/knowledge/honesty")).status_code == 200
                assert (await client.put("/v1/knowledge/x", json=DOC)).status_code == 403
                assert (await client.get("/v1/audit")).status_code == 403


async def test_revoked_and_expired_keys_are_refused_by_reason(kb: KnowledgeService, http: httpx.AsyncClient) -> None:
    old = await kb.create_key("old", "read")
    short = await kb.create_key("short", "read", expires_in_days=1)
    assert (await http.get("/v1/info", headers=bearer(old.token))).status_code == 200
    await kb.revoke_key("old")
    refused = await http.get("/v1/info", headers=bearer(old.token))
    assert refused.status_code == 401 and refused.json()["error"]["details"]["reason"] == "revoked"
    async with sqlite_db(kb).transaction() as conn:
        await conn.execute("UPDATE api_keys SET expires_at = '2020-01-01T00:00:00+00:00' WHERE name = 'short'")
    kb.key_source.forget()
    expired = await http.get("/v1/info", headers=bearer(short.token))
    assert expired.status_code == 401 and expired.json()["error"]["details"]["reason"] == "expired"


async def test_a_revoke_reaches_every_instance_within_a_second(settings: Settings) -> None:
    async with open_service(settings) as a, open_service(settings) as b:
        a.ready = b.ready = True
        token = (await a.create_key("rotating", "read")).token
        app_b = create_app(settings, b)
        async with app_b.router.lifespan_context(app_b):
            transport = httpx.ASGITransport(app=app_b)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
                assert (await client.get("/v1/info", headers=bearer(token))).status_code == 200
                await a.revoke_key("rotating")
                with anyio.fail_after(
                    10
                ):  # within a second by design (test_a_copy_of_the_keys_is_at_most_a_second_old)
                    while (await client.get("/v1/info", headers=bearer(token))).status_code == 200:
                        await anyio.sleep(0.02)
                # Revoking the last key does not open the door: a request without a key is still refused.
                assert (await client.get("/v1/info")).status_code == 401


async def test_a_copy_of_the_keys_is_at_most_a_second_old() -> None:
    now = [100.0]
    loads: list[float] = []

    async def load() -> list[tuple[ApiKey, str]]:
        loads.append(now[0])
        return []

    source = StoredKeys(load, clock=lambda: now[0])
    await source.refresh()
    now[0] += 0.99
    await source.refresh()
    assert loads == [100.0]  # a copy under a second old is used as it is
    now[0] += 0.02
    await source.refresh()
    assert loads == [100.0, pytest.approx(101.01)]  # past a second, the next request reads the keys again


async def test_scopes_over_mcp_on_real_http(kb: KnowledgeService, tokens: dict[str, str]) -> None:
    async with serving(create_app(kb.settings, kb)) as base:
        async with httpx2.AsyncClient(headers=bearer(tokens["read"])) as reader:
            async with Client(streamable_http_client(f"{base}/mcp", http_client=reader)) as client:
                found = payload(await client.call_tool("sage_search", {"query": "retry"}))
                assert found["hits"]
                refused = await client.call_tool("sage_save_knowledge", {"id": "x", "title": "X", "body": "y"})
                assert refused.is_error and "needs the write scope" in error_text(refused)
        async with httpx2.AsyncClient(headers=bearer(tokens["write"])) as writer:
            async with Client(streamable_http_client(f"{base}/mcp", http_client=writer)) as client:
                saved = await client.call_tool("sage_save_knowledge", {"id": "x", "title": "X", "body": "y"})
                assert not saved.is_error
    assert [(e.key, e.outcome) for e in await trail(kb, operation="save", target="x")] == [
        ("read-key", "forbidden"),
        ("write-key", "ok"),
    ]


# -- the audit trail --------------------------------------------------------------------------------------------


async def test_every_kind_of_change_is_recorded(
    kb: KnowledgeService, knowledge: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logging.getLogger("sage").setLevel(logging.ERROR)  # the trail does not depend on the log level
    try:
        await kb.save(DocumentIn(id="q", title="Q", layer="practices", body="one"))
        await kb.save(DocumentIn(id="q", title="Q", layer="practices", body="one"))
        await kb.save(DocumentIn(id="q", title="Q", layer="practices", body="two"), expected_revision=1)
        with pytest.raises(Conflict):
            await kb.save(DocumentIn(id="q", title="Q", layer="practices", body="three"), expected_revision=1)
        await kb.restore("q", 1)
        await kb.delete("q")
        await kb.purge("q")
        (knowledge / "scenarios" / "plain-note.md").unlink()
        await kb.import_paths([knowledge])
        await kb.create_key("k", "read")
        await kb.revoke_key("k")
    finally:
        logging.getLogger("sage").setLevel(logging.NOTSET)
    entries = [(e.operation, e.target, e.revision, e.outcome) for e in await trail(kb, key="local", client="local")]
    assert entries[-10:] == [
        ("save", "q", 1, "ok"),
        ("save", "q", 1, "unchanged"),
        ("save", "q", 2, "ok"),
        ("save", "q", None, "conflict"),
        ("restore", "q", 3, "ok"),
        ("delete", "q", 4, "ok"),
        ("purge", "q", 4, "ok"),
        ("import", str(knowledge), None, "ok"),
        ("key_create", "k", None, "ok"),
        ("key_revoke", "k", None, "ok"),
    ]
    imported = (await trail(kb, operation="import"))[-1]
    assert imported.detail["removed"] == 1


async def test_authentication_failures_are_counted_per_client_and_minute(
    kb: KnowledgeService, http: httpx.AsyncClient
) -> None:
    for _ in range(300):
        assert (await http.get("/v1/info", headers=bearer("sage_guess"))).status_code == 401
    assert (await http.get("/v1/info")).status_code == 401
    await kb.audit.flush()
    failures = await trail(kb, operation="authenticate")
    assert sorted((e.client, e.outcome, e.count) for e in failures) == [
        ("10.1.2.3", "invalid", 300),
        ("10.1.2.3", "missing", 1),
    ]
    samples = {
        (s.name, tuple(s.labels.items())): s.value
        for family in text_string_to_metric_families((await kb.scrape_metrics()).decode())
        for s in family.samples
    }
    assert samples[("sage_auth_failures_total", (("reason", "invalid"),))] == 300


async def test_requests_are_counted_and_logged_by_key_name_never_the_secret(
    kb: KnowledgeService, http: httpx.AsyncClient, tokens: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await http.put("/v1/knowledge/logged", json=DOC, headers=bearer(tokens["write"]))
    lines = [json.dumps(getattr(r, "context", {})) for r in caplog.records]
    assert any('"key": "write-key"' in line and '"operation": "save"' in line for line in lines)
    assert any('"key": "write-key"' in line and '"operation": "http"' in line for line in lines)  # the access line
    assert all(token not in line for line in lines for token in tokens.values())
    metrics = (await kb.scrape_metrics()).decode()
    assert 'sage_requests_by_key_total{key="write-key"} 1.0' in metrics


async def test_the_trail_survives_a_restore(settings: Settings, tmp_path: Path) -> None:
    async with open_service(settings) as kb:
        await kb.save(DocumentIn(id="before", title="B", layer="practices", body="b"))
        made = backup.backup(settings.db_path, tmp_path / "bk", retention_days=90)
        await kb.save(DocumentIn(id="after", title="A", layer="practices", body="a"))
    backup.restore(Path(made.path), settings.db_path)
    async with open_service(settings.model_copy(update={"import_on_start": False})) as kb:
        entries = (await kb.audit_trail(limit=1000)).entries
        targets = [(e.operation, e.target) for e in entries]
        assert ("save", "before") in targets and ("save", "after") in targets  # carried forward
        assert targets[-1] == ("restore_backup", made.path)
        assert entries[-1].detail == {"carried": 1}


async def test_old_entries_are_pruned_by_retention(kb: KnowledgeService) -> None:
    await kb.save(DocumentIn(id="q", title="Q", layer="practices", body="one"))
    async with sqlite_db(kb).transaction() as conn:
        await conn.execute("UPDATE audit SET at = '2020-01-01T00:00:00+00:00' WHERE target = 'q'")
    assert await kb.audit.prune() == 1
    assert await trail(kb, target="q") == []


async def test_stored_keys_count_as_a_credential_for_secure_defaults(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, host="0.0.0.0")
    ensure_admin_key(settings, stored_keys=True)
    assert not admin_key_path(settings).exists()
    ensure_admin_key(settings)
    assert admin_key_path(settings).exists()


def test_cli_keys_and_audit(tmp_path: Path) -> None:
    env = sage_env(tmp_path, SAGE_DB_PATH=str(tmp_path / "cli.db"), SAGE_BUNDLED_KNOWLEDGE="false")

    sage = sage_runner(tmp_path, env)

    made = sage("keys", "create", "ci", "--scope", "write", "--expires-in", "90", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    assert token.startswith("sage_") and token not in made.stderr
    listed = sage("keys", "list")
    assert "ci  write" in listed.stdout and token not in listed.stdout
    assert sage("keys", "create", "ci", "--scope", "read").returncode == 1
    assert sage("keys", "create", "x", "--scope", "owner").returncode == 2
    assert sage("keys", "revoke", "ci").returncode == 0
    assert sage("keys", "revoke", "ci").returncode == 1
    audit = sage("audit", "--since", "1h", "--json")
    assert [e["operation"] for e in json.loads(audit.stdout)["entries"]][:2] == ["key_create", "key_create"]
    assert "key_revoke ci  ok" in sage("audit").stdout
    assert sage("audit", "--since", "yesterday").returncode == 2
