"""One authentication rule on every route of every listener: REST, streamable HTTP /mcp, legacy SSE and its message
endpoint, tested route by route over real uvicorn; and the admin key `sage serve` generates beyond loopback."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from sage_server.app import create_app, create_mcp_app
from sage_server.auth import (
    ANONYMOUS,
    Authenticator,
    Principal,
    StaticKey,
    admin_key_path,
    ensure_admin_key,
    is_loopback,
    presented_token,
)
from sage_server.errors import ConfigError, Unauthorized
from sage_server.service import open_service
from tests.conftest import make_settings, sage_env
from tests.mcp_support import payload, serving, settings_for, write_knowledge
from tests.ports import free_port
from tests.test_serve import wait_ready

pytestmark = pytest.mark.anyio
KEY = "s3cret-key"
PROBES = {"/health", "/ready"}


# -- the rule ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({}, None),
        ({"authorization": f"Bearer {KEY}"}, KEY),
        ({"authorization": f"  bearer   {KEY}  "}, KEY),
        ({"authorization": f"BEARER\t{KEY}"}, KEY),
        ({"x-api-key": f" {KEY} "}, KEY),
        ({"authorization": "Bearer ", "x-api-key": KEY}, KEY),  # an empty Bearer falls back to X-API-Key
        ({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": KEY}, KEY),  # a proxy's own scheme does too
        ({"authorization": f"Bearer {KEY}", "x-api-key": "other"}, KEY),  # Bearer wins
    ],
)
def test_the_presented_token(headers: dict[str, str], token: str | None) -> None:
    assert presented_token(headers) == token


def test_another_authorization_scheme_is_refused_by_name() -> None:
    with pytest.raises(Unauthorized) as refused:
        presented_token({"authorization": "Basic dXNlcjpwYXNz"})
    assert refused.value.details["reason"] == "unsupported_scheme"


async def test_authenticator_resolves_a_principal_or_refuses_with_a_reason() -> None:
    open_door = Authenticator([])
    assert not open_door.required and await open_door.authenticate({"x-api-key": "anything"}) == ANONYMOUS

    door = Authenticator([StaticKey("SAGE_API_KEY", KEY)])
    assert door.required and "SAGE_API_KEY" in door.describe() and KEY not in door.describe()
    principal = await door.authenticate({"authorization": f"Bearer  {KEY} "})
    assert principal.name == "admin" and principal.allows("write") and not principal.anonymous
    for headers, reason in [({}, "missing"), ({"x-api-key": "wrong"}, "invalid")]:
        with pytest.raises(Unauthorized) as refused:
            await door.authenticate(headers)
        assert refused.value.details["reason"] == reason
        assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")


async def test_sources_are_asked_in_order_and_a_later_one_can_answer() -> None:
    # The shape stored keys and OAuth issuers will take: more sources behind the same rule.
    team = StaticKey("team keys", "team-token", principal=Principal("ci-bot", frozenset({"read"})))
    door = Authenticator([StaticKey("SAGE_API_KEY", KEY), team])
    bot = await door.authenticate({"x-api-key": "team-token"})
    assert bot.name == "ci-bot" and bot.allows("read") and not bot.allows("write")


# -- route by route, on both listeners ---------------------------------------------------------------------


@dataclass
class Listeners:
    api: str
    mcp: str
    api_app: Starlette
    mcp_app: Starlette


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[Listeners]:
    settings = settings_for(tmp_path, write_knowledge(tmp_path / "kb"), api_key=KEY)
    async with open_service(settings) as kb:
        kb.ready = True
        api_app, mcp_app = create_app(settings, kb), create_mcp_app(settings, kb)
        async with serving(api_app) as api, serving(mcp_app) as mcp:
            yield Listeners(api, mcp, api_app, mcp_app)


def every_request(app: Starlette) -> list[tuple[str, str]]:
    """(method, path) for every method of every route the app serves, MCP's included."""
    found: list[tuple[str, str]] = []
    for route in app.routes:
        if isinstance(route, Mount):  # the SSE message endpoint
            found.append(("POST", route.path + "/"))
        elif isinstance(route, Route):
            methods = sorted(route.methods or {"GET", "POST", "DELETE"})  # /mcp takes any method
            found += [(method, route.path.replace("{doc_id}", "timeout-resilience")) for method in methods]
    return found


BODIES = {
    "/v1/knowledge/timeout-resilience": {"title": "T", "layer": "practices", "body": "Body."},
    "/v1/knowledge/timeout-resilience/restore": {"revision": 1},
    "/v1/context": {"task": "retries"},
    "/mcp": {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
    "/messages/": {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
}
CREDENTIALS = {
    "none": ({}, False),
    "wrong key": ({"Authorization": "Bearer not-the-key"}, False),
    "wrong X-API-Key": ({"X-API-Key": "not-the-key"}, False),
    # Trailing spaces never reach the server: HTTP strips them as optional whitespace (and h11 will not send them).
    "Bearer with spaces": ({"Authorization": f"Bearer   {KEY}"}, True),
    "X-API-Key": ({"X-API-Key": KEY}, True),
}


async def status_of(client: httpx.AsyncClient, method: str, url: str, headers: dict[str, str]) -> tuple[int, str]:
    path = httpx.URL(url).path
    body = BODIES.get(path) if method in {"POST", "PUT"} else None
    # Streamed, and closed once the status is in: GET /sse would otherwise stream forever.
    async with client.stream(
        method, url, json=body, headers={"Accept": "application/json, text/event-stream", **headers}
    ) as response:
        return response.status_code, response.headers.get("www-authenticate", "")


@pytest.mark.parametrize("listener", ["api", "mcp"])
@pytest.mark.parametrize("credential", sorted(CREDENTIALS))
async def test_every_route_on_every_listener_applies_the_same_rule(
    keyed: Listeners, listener: str, credential: str
) -> None:
    base, app = (keyed.api, keyed.api_app) if listener == "api" else (keyed.mcp, keyed.mcp_app)
    headers, valid = CREDENTIALS[credential]
    requests = every_request(app)
    assert {"/health", "/ready", "/mcp", "/sse", "/messages/"} <= {path for _, path in requests}
    wrong: list[str] = []
    with anyio.fail_after(60):
        async with httpx.AsyncClient(timeout=10) as client:
            for method, path in requests:
                if valid and (method, path) == ("HEAD", "/sse"):
                    continue  # the SDK's SSE endpoint mishandles HEAD (leaks a stream); GET /sse is what clients use
                status, challenge = await status_of(client, method, f"{base}{path}", headers)
                if path in PROBES:
                    ok = status in (200, 503)
                elif valid:
                    ok = status not in (401, 403, 421) and status < 500
                else:
                    ok = status == 401 and challenge.startswith("Bearer")
                if not ok:
                    wrong.append(f"{method} {path}: {status}")
    assert not wrong, f"{credential} on the {listener} listener: {wrong}"


@pytest.mark.parametrize(
    "header",
    [{"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer   {KEY}"}, {"X-API-Key": KEY}],
    ids=["bearer", "bearer-spaces", "x-api-key"],
)
async def test_official_clients_connect_with_a_key_over_sse_and_streamable_http(
    keyed: Listeners, header: dict[str, str]
) -> None:
    with anyio.fail_after(60):
        async with Client(sse_client(f"{keyed.mcp}/sse", headers=header), mode="legacy") as client:
            found = payload(await client.call_tool("sage_search", {"query": "retry"}))
            assert found["hits"][0]["id"] == "timeout-resilience"
        for base in (keyed.api, keyed.mcp):
            async with httpx2.AsyncClient(headers=header) as http:
                async with Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client:
                    saved = payload(
                        await client.call_tool("sage_save_knowledge", {"id": "keyed", "title": "K", "body": "zebu\n"})
                    )
                    assert saved["revision"] >= 1


async def test_clients_without_the_key_cannot_connect(keyed: Listeners) -> None:
    with anyio.fail_after(30):
        with pytest.raises(Exception) as refused:  # the SDK surfaces the 401 as an HTTP error of its transport
            async with Client(sse_client(f"{keyed.mcp}/sse"), mode="legacy") as client:
                await client.list_tools()
        assert "401" in repr(refused.value) or "Unauthorized" in repr(refused.value)


async def test_an_sse_session_answers_only_the_credential_that_opened_it(keyed: Listeners) -> None:
    # The principal is where the SDK binds sessions: the message endpoint needs the key too, not just /sse.
    with anyio.fail_after(30):
        async with httpx.AsyncClient(timeout=10, headers={"X-API-Key": KEY}) as client:
            async with client.stream("GET", f"{keyed.mcp}/sse") as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                endpoint = ""
                while not endpoint.startswith("data: /messages/"):
                    endpoint = await anext(lines)
                url = keyed.mcp + endpoint.removeprefix("data: ")
                message = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
                async with httpx.AsyncClient(timeout=10) as stranger:
                    assert (await stranger.post(url, json=message)).status_code == 401
                assert (await client.post(url, json=message)).status_code == 202


# -- secure by default -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True)]
    + [("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False), ("sage.internal", False)],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_key_is_generated_beyond_loopback_once_owner_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    settings = make_settings(tmp_path, host="0.0.0.0", db_path=tmp_path / "data" / "sage.db")
    ensure_admin_key(settings)
    path = admin_key_path(settings)
    key = path.read_text().strip()
    assert path.parent == tmp_path / "data" and len(key) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    printed = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(printed) == 1 and "Authorization: Bearer" in printed[0]
    ensure_admin_key(settings)  # the next start keeps it and does not print it again
    assert path.read_text().strip() == key
    assert len([r for r in caplog.records if key in r.getMessage()]) == 1
    assert Authenticator.from_settings(settings).required


@pytest.mark.parametrize(
    "overrides",
    [{"host": "127.0.0.1"}, {"host": "0.0.0.0", "api_key": KEY}, {"host": "0.0.0.0", "allow_anonymous": True}],
    ids=["loopback", "own-key", "anonymous"],
)
def test_no_key_is_generated_when_not_needed(
    tmp_path: Path, overrides: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, **overrides)
    ensure_admin_key(settings)
    assert not admin_key_path(settings).exists()
    if overrides.get("allow_anonymous"):
        assert any("without any credential" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_a_data_folder_that_cannot_hold_the_key_stops_the_server_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    settings = make_settings(tmp_path, host="0.0.0.0", db_path=tmp_path / "not-a-folder" / "sage.db")
    with pytest.raises(ConfigError, match="SAGE_API_KEY"):
        ensure_admin_key(settings)


def _outside_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@dataclass
class Served:
    process: subprocess.Popen[str]
    api: str
    metrics_port: int
    log: Path

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        self.process.terminate()
        assert self.process.wait(30) == 0


def serve_everywhere(tmp_path: Path, data: Path, **env: str) -> Served:
    """`sage serve --host 0.0.0.0`, as the Dockerfile runs it, with its data folder at `data`."""
    ports = [free_port() for _ in range(3)]
    log = tmp_path / f"serve-{ports[0]}.log"
    variables = sage_env(
        tmp_path,
        SAGE_DB_PATH=str(data / "sage.db"),
        SAGE_BUNDLED_KNOWLEDGE="false",
        SAGE_API_PORT=str(ports[0]),
        SAGE_MCP_PORT=str(ports[1]),
        SAGE_METRICS_PORT=str(ports[2]),
        **env,
    )
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "sage_server", "serve", "--host", "0.0.0.0"],
            cwd=tmp_path,
            env=variables,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    served = Served(process, f"http://127.0.0.1:{ports[0]}", ports[2], log)
    wait_ready(served.api, process)
    return served


@pytest.mark.e2e
def test_sage_serve_beyond_loopback_generates_a_key_and_requires_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    served = serve_everywhere(tmp_path, data)
    try:
        key = (data / "admin.key").read_text().strip()
        assert stat.S_IMODE((data / "admin.key").stat().st_mode) == 0o600
        assert served.log.read_text().count(key) == 1
        assert httpx.get(f"{served.api}/health").status_code == 200  # probes and HEALTHCHECK stay open
        assert httpx.get(f"{served.api}/v1/info").status_code == 401
        assert httpx.get(f"{served.api}/v1/info", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        rule = next(line for line in served.lines() if line["message"] == "Authentication")
        assert "admin.key" in json.dumps(rule) and key not in json.dumps(rule)
        # Metrics carry no credential check, so they listen on loopback only.
        assert httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics").status_code == 200
        outside = _outside_address()
        if outside is not None:
            assert httpx.get(f"http://{outside}:{served.api.rsplit(':', 1)[1]}/health").status_code == 200
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{outside}:{served.metrics_port}/metrics")
    finally:
        served.stop()
    again = serve_everywhere(tmp_path, data)  # a restart keeps the key and does not print it again
    try:
        assert key not in again.log.read_text()
        assert httpx.get(f"{again.api}/v1/info", headers={"X-API-Key": key}).status_code == 200
    finally:
        again.stop()


@pytest.mark.e2e
def test_allow_anonymous_opts_out_with_a_warning(tmp_path: Path) -> None:
    served = serve_everywhere(tmp_path, tmp_path / "data", SAGE_ALLOW_ANONYMOUS="true")
    try:
        assert not (tmp_path / "data" / "admin.key").exists()
        assert httpx.get(f"{served.api}/v1/info").status_code == 200
        warnings = [line for line in served.lines() if line["level"] == "WARNING"]
        assert any("without any credential" in str(line["message"]) for line in warnings)
    finally:
        served.stop()
