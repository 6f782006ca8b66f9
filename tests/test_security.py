"""Hostile requests: foreign Host and Origin headers, bodies that are not JSON, deep nesting, huge numbers, thousands
of filters, huge ids, and faults inside the server. Each is a 4xx in the one error shape, never a 500 or a leak."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from starlette.applications import Starlette

from sage_server.app import create_app, create_mcp_app
from sage_server.errors import Unavailable
from sage_server.logs import JsonFormatter
from sage_server.models import MAX_REVISION
from sage_server.service import KnowledgeService
from tests.conftest import make_settings
from tests.mcp_support import error_text, serving
from tests.test_auth import every_request
from tests.test_rest import _client

pytestmark = pytest.mark.anyio
JSON = {"Content-Type": "application/json"}
DOC = {"title": "Rate Limits", "layer": "practices", "body": "Token buckets smooth bursts."}


@pytest.fixture
async def http(service: KnowledgeService) -> AsyncIterator[httpx.AsyncClient]:
    service.ready = True
    async with _client(create_app(service.settings, service)) as client:
        yield client


@pytest.fixture
async def mcp(service: KnowledgeService) -> AsyncIterator[Client]:
    from sage_server.assistant import build_server

    async with Client(build_server(service), raise_exceptions=True) as client:
        yield client


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error body, checked for the one shape."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"status", "code", "message", "details"}
    assert body["error"]["status"] == response.status_code
    error: dict[str, Any] = body["error"]
    return error


# -- Host and Origin ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [create_app, create_mcp_app], ids=["api", "mcp"])
async def test_every_route_but_the_probes_refuses_a_foreign_host(service: KnowledgeService, factory: Any) -> None:
    service.ready = True
    app: Starlette = factory(service.settings, service)
    wrong: list[str] = []
    async with _client(app) as client:
        for method, path in every_request(app):
            response = await client.request(method, path, headers={"Host": "evil.example"}, json={})
            expected = 200 if path in ("/health", "/ready") else 421
            if response.status_code != expected:
                wrong.append(f"{method} {path}: {response.status_code}")
    assert not wrong


async def test_dns_rebinding_cannot_write(http: httpx.AsyncClient) -> None:
    response = await http.put("/v1/knowledge/rebound", json=DOC, headers={"Host": "evil.example"})
    assert response.status_code == 421 and error_of(response)["code"] == "misdirected_request"
    assert "SAGE_ALLOWED_HOSTS" in error_of(response)["message"]
    assert (await http.get("/v1/knowledge/rebound")).status_code == 404


async def test_a_cross_site_post_cannot_roll_a_document_back(http: httpx.AsyncClient) -> None:
    await http.put("/v1/knowledge/csrf-target", json=DOC)
    await http.put("/v1/knowledge/csrf-target", json={**DOC, "body": "The current text."})
    form = {"Content-Type": "text/plain"}
    # A page elsewhere posts a text/plain "simple request" (no CORS preflight): refused for its Origin...
    cross = await http.post(
        "/v1/knowledge/csrf-target/restore",
        content=b'{"revision": 1}',
        headers={**form, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert cross.status_code == 403 and error_of(cross)["code"] == "forbidden"
    # ...and, without an Origin (an old browser, a form), for not being JSON.
    plain = await http.post("/v1/knowledge/csrf-target/restore", content=b'{"revision": 1}', headers=form)
    assert plain.status_code == 415 and error_of(plain)["code"] == "unsupported_media_type"
    assert (await http.get("/v1/knowledge/csrf-target")).json()["body"] == "The current text."


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("http://localhost:3000", 201),
        ("https://127.0.0.1", 201),
        ("http://evil.example", 403),
        ("null", 403),  # sandboxed frames and files
        ("http://localhost.evil.example", 403),
        ("file://localhost", 403),
    ],
)
async def test_origin_must_be_this_server(http: httpx.AsyncClient, origin: str, status: int) -> None:
    response = await http.put(f"/v1/knowledge/o-{status}-{len(origin)}", json=DOC, headers={"Origin": origin})
    assert response.status_code == status, response.text


async def test_allowed_hosts_extend_the_rule_and_star_allows_any(tmp_path: Path, knowledge: Path) -> None:
    for allowed, host, origin, status in [
        (["kb.example"], "kb.example:8000", "https://kb.example", 201),
        (["kb.example"], "other.example", None, 421),
        (["*"], "10.0.0.5:8000", None, 201),
        (["*"], "10.0.0.5:8000", "http://10.0.0.5:8000", 201),  # same origin
        (["*"], "10.0.0.5:8000", "http://evil.example", 403),
    ]:
        settings = make_settings(tmp_path, knowledge_dirs=[knowledge], allowed_hosts=allowed)
        async with _client(create_app(settings)) as client:
            headers = {"Host": host, **({"Origin": origin} if origin else {})}
            response = await client.put("/v1/knowledge/hosted", json=DOC, headers=headers)
            assert response.status_code in (status, 200 if status == 201 else status), (allowed, host, origin)


# -- bodies ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (None, 415),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/json", 201),
        ("application/json; charset=utf-8", 201),
        ("application/merge-patch+json", 201),
    ],
)
async def test_json_bodies_must_say_so(http: httpx.AsyncClient, content_type: str | None, status: int) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await http.put(
        f"/v1/knowledge/typed-{status}-{len(content_type or '')}", content=json.dumps(DOC), headers=headers
    )
    assert response.status_code == status, response.text
    if status == 415:
        assert "application/json" in error_of(response)["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"title": "Rate\x1b[2J limits"}, "title"),
        ({"tags": ["\t"]}, "tags"),
        ({"body": "Form\x0cfeed"}, "body"),
        ({"related": [" spaced "]}, "related"),
        ({"translations": {"x-klingon-dialect": {"title": "T"}}}, "translations"),
    ],
)
async def test_a_document_says_exactly_what_openapi_says(
    http: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    response = await http.put("/v1/knowledge/described", json={**DOC, **change})
    assert response.status_code == 422 and error_of(response)["details"]["field"].startswith(field), response.text
    crlf = await http.put("/v1/knowledge/described", json={**DOC, "body": "Line one\r\nLine two\twith a tab"})
    assert crlf.status_code == 201 and crlf.json()["body"] == "Line one\nLine two\twith a tab"


@pytest.mark.parametrize("depth", [1_000, 100_000])
async def test_deep_nesting_is_422(http: httpx.AsyncClient, depth: int) -> None:
    nested = b"[" * depth + b"]" * depth
    for path, body in [
        ("/v1/knowledge/deep/restore", nested),
        ("/v1/knowledge/deep", b'{"title": ' + nested + b', "layer": "core", "body": "x"}'),
        ("/v1/context", b'{"task": "x", "layer": ' + nested + b"}"),
    ]:
        method = "PUT" if path == "/v1/knowledge/deep" else "POST"
        response = await http.request(method, path, content=body, headers=JSON)
        assert response.status_code == 422, (path, response.text[:300])
        assert len(response.text) < 2_000


async def test_huge_revisions_are_422_over_rest(http: httpx.AsyncClient) -> None:
    await http.put("/v1/knowledge/numbers", json=DOC)
    for raw in [b'{"revision": 99999999999999999999999}', b'{"revision": ' + b"9" * 5000 + b"}"]:
        response = await http.post("/v1/knowledge/numbers/restore", content=raw, headers=JSON)
        assert response.status_code == 422, response.text
        error = error_of(response)
        assert "revision" in error["message"] or "JSON" in error["message"]
        assert len(error["message"]) < 400
    huge = await http.post("/v1/knowledge/numbers/restore", json={"revision": 2**70})
    assert f"revision must be an integer from 1 to {MAX_REVISION}" in error_of(huge)["message"]
    # A huge If-Match names no current revision: the precondition fails.
    stale = await http.put("/v1/knowledge/numbers", json=DOC, headers={"If-Match": '"' + "9" * 19 + '"'})
    assert stale.status_code == 412


async def test_a_failed_if_match_is_412_and_mcp_keeps_its_conflict(http: httpx.AsyncClient, mcp: Client) -> None:
    await http.put("/v1/knowledge/guarded", json=DOC)
    for method in ("PUT", "DELETE"):
        response = await http.request(method, "/v1/knowledge/guarded", json=DOC, headers={"If-Match": '"7"'})
        assert response.status_code == 412 and error_of(response)["code"] == "precondition_failed"
        assert error_of(response)["details"]["current_revision"] == 1
    changed = {**DOC, "body": "Changed."}
    assert (await http.put("/v1/knowledge/guarded", json=changed, headers={"If-Match": ""})).status_code == 200
    conflict = error_text(
        await mcp.call_tool("sage_save_knowledge", {"id": "guarded", "title": "T", "body": "b", "expected_revision": 7})
    )
    assert "conflict: document 'guarded' is at revision 2" in conflict


async def test_too_many_tag_filters_are_422_not_a_database_error(
    http: httpx.AsyncClient, mcp: Client, service: KnowledgeService
) -> None:
    cap = service.settings.max_filters
    many = [("tag", f"t{n}") for n in range(5_000)]
    for path, extra in [("/v1/search", [("q", "retry")]), ("/v1/knowledge", [])]:
        response = await http.get(path, params=[*extra, *many])
        assert response.status_code == 422, response.text[:300]
        assert error_of(response)["message"] == f"at most {cap} tag filters are allowed, got 5000"
        assert "Expression tree" not in response.text
        assert (await http.get(path, params=[*extra, *many[:cap]])).status_code == 200
    for odd in ("", "a\x0bb"):  # no tag is empty or holds a control character: such a filter is a mistake
        assert (await http.get("/v1/knowledge", params={"tag": odd})).status_code == 422
    message = error_text(await mcp.call_tool("sage_search", {"query": "retry", "tags": [f"t{n}" for n in range(60)]}))
    assert f"at most {cap} tag filters" in message


async def test_the_filter_cap_is_a_setting(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], max_filters=2)
    async with _client(create_app(settings)) as client:
        assert (await client.get("/v1/knowledge", params=[("tag", "a"), ("tag", "b")])).status_code == 200
        assert (await client.get("/v1/knowledge", params=[("tag", "a"), ("tag", "b"), ("tag", "c")])).status_code == 422


async def test_a_huge_id_is_not_echoed_back_whole(http: httpx.AsyncClient, mcp: Client) -> None:
    huge = "a" * 60_000
    for response in [
        await http.get(f"/v1/knowledge/{huge}"),
        await http.get(f"/v1/knowledge/{huge}/history"),
        await http.put(f"/v1/knowledge/{huge}", json=DOC),
        await http.get("/v1/search", params={"q": "x", huge: "1"}),
    ]:
        assert response.status_code == 422 and len(response.text) < 1_000, response.text[:200]
        assert huge[:200] not in response.text
    assert len((await http.get(f"/v1/{huge}")).text) < 1_000  # no route: bounded too
    for tool, arguments in [("sage_get_document", {"id": huge}), ("sage_history", {"id": huge})]:
        message = error_text(await mcp.call_tool(tool, arguments))
        assert len(message) < 600 and "id must be a string of 1 to 128 characters" in message


async def test_mcp_over_http_answers_hostile_json_with_a_parse_error(http: httpx.AsyncClient) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    headers = {**JSON, "Accept": "application/json, text/event-stream"}
    for arguments in [f'{{"query": "x", "tags": {nested}}}', '{"id": "honesty", "revision": ' + "9" * 5000 + "}"]:
        params = f'{{"name": "sage_search", "arguments": {arguments}}}'
        call = f'{{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {params}}}'
        response = await http.post("/mcp", content=call, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["code"] == -32700  # JSON-RPC parse error


# -- MCP arguments -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        (
            "sage_restore_revision",
            {"id": "honesty", "revision": 2**70},
            f"revision must be an integer from 1 to {MAX_REVISION}",
        ),
        ("sage_restore_revision", {"id": "honesty", "revision": 0}, "revision must be an integer from 1 to"),
        (
            "sage_save_knowledge",
            {"id": "x", "title": "T", "body": "b", "expected_revision": 2**70},
            "expected_revision must be an integer from 0 to",
        ),
        ("sage_search", {"query": "retry", "limit": 500}, "limit must be an integer from 1 to 100 (got 500)"),
        ("sage_search", {"query": "retry", "limit": "many"}, "limit must be an integer from 1 to 100 (got 'many')"),
        ("sage_search", {"query": "retry", "max_tokens": 25_000}, "max_tokens must be an integer from 200 to 20000"),
        ("sage_get_context", {}, "task is required"),
        ("sage_get_document", {"id": "honesty", "offset": 2**70}, "offset"),
    ],
)
async def test_mcp_argument_errors_name_the_argument_and_its_range(
    mcp: Client, tool: str, arguments: dict[str, Any], expected: str
) -> None:
    message = error_text(await mcp.call_tool(tool, arguments))
    assert message.startswith(f"Error executing tool {tool}: invalid_input: ")
    assert expected in message
    assert "pydantic" not in message and "https://" not in message and len(message) < 400


# -- faults inside the server ------------------------------------------------------------------------------


async def test_an_internal_error_answers_the_request_id_and_logs_the_rest(
    http: httpx.AsyncClient,
    service: KnowledgeService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals at /var/lib/sage")

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise Unavailable("database error during info: disk I/O error at /var/lib/sage/sage.db")

    caplog.set_level(logging.INFO)
    formatter = JsonFormatter()
    for fault, status, code in [(broken, 500, "internal_error"), (unavailable, 503, "unavailable")]:
        monkeypatch.setattr(service, "info", fault)
        response = await http.get("/v1/info", headers={"X-Request-ID": f"req-{status}"})
        assert response.status_code == status
        error = error_of(response)
        assert error["code"] == code and error["details"] == {"request_id": f"req-{status}"}
        assert f"req-{status}" in error["message"] and "/var/lib" not in response.text
        logged = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "sage.http"]
        assert any(
            line["context"].get("request_id") == f"req-{status}" and "/var/lib/sage" in json.dumps(line)
            for line in logged
        )


async def test_mcp_hides_internal_error_text_too(
    mcp: Client, service: KnowledgeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise Unavailable("database error during info: disk I/O error at /var/lib/sage/sage.db")

    monkeypatch.setattr(service, "info", unavailable)
    message = error_text(await mcp.call_tool("sage_info", {}))
    assert "unavailable:" in message and "/var/lib" not in message


async def test_a_500_keeps_the_connection_alive(service: KnowledgeService, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "info", broken)
    service.ready = True
    async with serving(create_app(service.settings, service)) as url:
        host, port = url.removeprefix("http://").split(":")
        with anyio.fail_after(20):
            async with await anyio.connect_tcp(host, int(port)) as stream:
                statuses = []
                for path in ("/v1/info", "/health", "/v1/info"):  # three requests on one connection
                    await stream.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                    statuses.append(await _read_response(stream))
    assert statuses == [500, 200, 500]


async def _read_response(stream: anyio.abc.ByteStream) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    assert not any(line.lower() == "connection: close" for line in lines)
    while len(body) < length:
        body += await stream.receive()
    return int(lines[0].split()[1])


# -- one error shape ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PATCH", "/v1/knowledge/honesty", "GET, HEAD, PUT, DELETE"),
        ("TRACE", "/health", "GET, HEAD"),
        ("DELETE", "/v1/info", "GET, HEAD"),
        ("GET", "/v1/knowledge/honesty/restore", "POST"),
        ("PUT", "/v1/context", "GET, HEAD, POST"),
    ],
)
async def test_405_names_the_allowed_methods(http: httpx.AsyncClient, method: str, path: str, allow: str) -> None:
    response = await http.request(method, path)
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"
    assert set(response.headers["allow"].split(", ")) == set(allow.split(", "))


async def test_metrics_listener_errors_have_the_same_shape(service: KnowledgeService) -> None:
    from sage_server.app import create_metrics_app

    async with _client(create_metrics_app(service)) as client:
        missing = await client.get("/nothing")
        assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
        wrong = await client.post("/metrics")
        assert wrong.status_code == 405 and wrong.headers["allow"]
