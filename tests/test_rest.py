"""The REST facade in-process (httpx over ASGI, inside the app lifespan): routes, errors, auth, limits."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from sage_server.app import create_app
from sage_server.config import Settings
from sage_server.logs import JsonFormatter
from sage_server.service import KnowledgeService, open_service
from tests.conftest import BACKENDS, database_for, make_settings

pytestmark = pytest.mark.anyio
JSON = {"Content-Type": "application/json"}


@pytest.fixture(params=BACKENDS)
async def settings(request: pytest.FixtureRequest, tmp_path: Path, knowledge: Path) -> AsyncIterator[Settings]:
    """Every test served from the `service` fixture runs on SQLite and on PostgreSQL."""
    async with database_for(request.param) as database:
        yield make_settings(tmp_path, knowledge_dirs=[knowledge], **database)


@asynccontextmanager
async def _client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            yield client


@pytest.fixture
async def http(service: KnowledgeService) -> AsyncIterator[httpx.AsyncClient]:
    service.ready = True
    async with _client(create_app(service.settings, service)) as client:
        yield client


async def test_health_is_the_spec_document(http: httpx.AsyncClient) -> None:
    response = await http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy" and set(body["components"]) == {"core", "cache", "knowledge", "backup"}
    assert body["version"]
    assert response.headers["x-request-id"]


async def test_ready_waits_for_the_first_import(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge])
    kb = KnowledgeService(settings)
    await kb.start(import_now=False)
    try:
        async with _client(create_app(settings, kb)) as client:
            assert (await client.get("/ready")).status_code == 503
            await kb.import_configured()
            assert (await client.get("/ready")).json() == {"ready": True}
    finally:
        await kb.close()


async def test_document_round_trip_with_if_match(http: httpx.AsyncClient) -> None:
    doc = {"title": "Rate Limits", "layer": "practices", "body": "Token buckets smooth bursts.", "tags": ["api"]}
    created = await http.put("/v1/knowledge/rate-limits", json=doc)
    assert created.status_code == 201 and created.headers["etag"] == '"1"'
    again = await http.put("/v1/knowledge/rate-limits", json=doc)  # identical: nothing created, nothing stored
    assert again.status_code == 200 and again.headers["etag"] == '"1"' and again.json()["revision"] == 1
    got = await http.get("/v1/knowledge/rate-limits")
    assert got.json()["body"] == "Token buckets smooth bursts." and got.headers["etag"] == '"1"'
    updated = await http.put(
        "/v1/knowledge/rate-limits", json={**doc, "body": "Leaky buckets too."}, headers={"If-Match": '"1"'}
    )
    assert updated.status_code == 200 and updated.json()["revision"] == 2
    stale = await http.put("/v1/knowledge/rate-limits", json={**doc, "body": "lost"}, headers={"If-Match": "1"})
    assert stale.status_code == 412 and stale.json()["error"]["code"] == "precondition_failed"
    assert stale.json()["error"]["details"]["current_revision"] == 2
    history = (await http.get("/v1/knowledge/rate-limits/history")).json()
    assert [r["revision"] for r in history["revisions"]] == [2, 1]
    assert (await http.delete("/v1/knowledge/rate-limits")).json()["deleted"] is True
    assert (await http.get("/v1/knowledge/rate-limits")).status_code == 404
    restored = await http.post("/v1/knowledge/rate-limits/restore", json={"revision": 1})
    assert restored.json()["body"] == "Token buckets smooth bursts."


async def test_search_list_context_info(http: httpx.AsyncClient) -> None:
    search = (await http.get("/v1/search", params={"q": "circuit breaker", "limit": 5})).json()
    assert search["hits"][0]["id"] == "timeout-resilience"
    listing = (await http.get("/v1/knowledge", params=[("layer", "core")])).json()
    assert [item["id"] for item in listing["items"]] == ["honesty"]
    context = (await http.get("/v1/context", params={"task": "add retries", "max_tokens": 300})).json()
    assert context["tokens_used"] <= 300 and context["sections"][0]["id"] == "timeout-resilience"
    posted = await http.post("/v1/context", json={"task": "rotate a leaked api key", "max_tokens": 400})
    assert posted.json()["sections"][0]["id"] == "handling-secrets"
    info = (await http.get("/v1/info")).json()
    assert info["documents"] == 4


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("GET", "/v1/search", {}, 422, "invalid_input"),
        ("GET", "/v1/search", {"params": {"q": "x", "limit": "many"}}, 422, "invalid_input"),
        ("GET", "/v1/search", {"params": {"q": "x", "layer": "nope"}}, 422, "invalid_input"),
        ("GET", "/v1/search", {"params": {"q": "x", "bogus": "1"}}, 422, "invalid_input"),
        ("GET", "/v1/knowledge/honsety", {}, 404, "not_found"),
        ("GET", "/v1/nothing-here", {}, 404, "not_found"),
        ("PATCH", "/v1/info", {}, 405, "method_not_allowed"),
        ("PUT", "/v1/knowledge/x", {"content": b"{not json", "headers": JSON}, 422, "invalid_input"),
        ("PUT", "/v1/knowledge/x", {"content": b'{"title": "T"}'}, 415, "unsupported_media_type"),
        ("GET", "/v1/knowledge/x/restore", {}, 405, "method_not_allowed"),
        ("PUT", "/v1/knowledge/x", {"json": {"title": "T"}}, 422, "invalid_input"),
        (
            "PUT",
            "/v1/knowledge/x",
            {"json": {"title": "T", "layer": "core", "body": "b"}, "headers": {"If-Match": "x"}},
            422,
            "invalid_input",
        ),
        ("PUT", "/v1/knowledge/bad%20id", {"json": {"title": "T", "layer": "core", "body": "b"}}, 422, "invalid_input"),
    ],
)
async def test_errors_share_one_json_shape(
    http: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, object], status: int, code: str
) -> None:
    response = await http.request(method, path, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["status"], error["code"]) == (status, code) and error["message"]


async def test_unknown_id_suggests_close_ids(http: httpx.AsyncClient) -> None:
    error = (await http.get("/v1/knowledge/honsety")).json()["error"]
    assert error["details"]["suggestions"] == ["honesty"]


async def test_oversized_body_is_413(http: httpx.AsyncClient, service: KnowledgeService) -> None:
    huge = b'{"title": "T", "layer": "core", "body": "' + b"x" * (service.settings.max_file_bytes * 2 + 10) + b'"}'
    response = await http.put("/v1/knowledge/huge", content=huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


async def test_openapi_describes_every_route(http: httpx.AsyncClient, service: KnowledgeService) -> None:
    spec = (await http.get("/openapi.json")).json()
    assert spec["openapi"] == "3.1.0"
    served = {route.path for route in create_app(service.settings, service).routes if isinstance(route, Route)}
    assert set(spec["paths"]) == served - {"/openapi.json", "/mcp", "/sse"}
    assert "SearchResult" in spec["components"]["schemas"]
    # What schemathesis found missing: PUT's 201, layers as an enum, If-Match described.
    put = spec["paths"]["/v1/knowledge/{doc_id}"]["put"]
    assert {"200", "201", "412", "415", "422"} <= set(put["responses"])
    if_match = next(p for p in put["parameters"] if p["name"] == "If-Match")
    assert "412" in if_match["description"] and if_match["schema"]["pattern"]
    layers = service.settings.layers
    assert spec["components"]["schemas"]["DocumentBody"]["properties"]["layer"]["enum"] == layers
    search = {p["name"]: p for p in spec["paths"]["/v1/search"]["get"]["parameters"]}
    assert search["layer"]["schema"]["items"]["enum"] == layers
    # Without a credential configured, no operation claims to need one.
    assert all("security" not in op for ops in spec["paths"].values() for op in ops.values())


async def test_rate_limit_answers_429_but_never_to_probes(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], rate_limit_per_minute=2)
    async with open_service(settings) as kb:
        async with _client(create_app(settings, kb)) as client:
            assert [(await client.get("/v1/info")).status_code for _ in range(2)] == [200, 200]
            limited = await client.get("/v1/info")
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
            assert limited.json()["error"]["code"] == "rate_limited"
            for _ in range(5):
                assert (await client.get("/health")).status_code == 200


async def test_operation_logs_carry_the_request_id(http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    doc = {"title": "Audit", "layer": "practices", "body": "Who changed what."}
    await http.put("/v1/knowledge/audited", json=doc, headers={"X-Request-ID": "req-77"})
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "sage.core"]
    save = next(line for line in lines if line["context"].get("operation") == "save")
    assert save["context"]["request_id"] == "req-77" and save["context"]["audit"] is True


async def test_control_characters_are_refused_naming_the_field(http: httpx.AsyncClient) -> None:
    doc = {"title": "Red \u001b[31m alert", "layer": "practices", "body": "text"}
    response = await http.put("/v1/knowledge/controls", json=doc)
    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"] == "title"
    assert "control character U+001B" in response.json()["error"]["message"]
    tabs = {"title": "Fine", "layer": "practices", "body": "line\r\n\tindented"}
    assert (await http.put("/v1/knowledge/controls", json=tabs)).json()["body"] == "line\n\tindented"
