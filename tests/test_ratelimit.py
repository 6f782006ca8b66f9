"""Rate limits per key (per client address without one), shared by instances through Redis, kept in process while
Redis is down; and the trusted-proxy rule that decides which client address limits, logs and the audit trail see."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from sage_server.app import create_app
from sage_server.config import Settings, load_settings
from sage_server.errors import ConfigError
from sage_server.logs import JsonFormatter
from sage_server.ratelimit import LocalWindows, RateLimiter
from sage_server.service import KnowledgeService, open_service
from tests.conftest import make_settings
from tests.listener_support import listening
from tests.redis_support import RedisServer
from tests.test_serve import scrape, start

pytestmark = pytest.mark.anyio
DOC = {"title": "Forwarded", "layer": "practices", "body": "Who sent this?"}


# -- the in-process window ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_local_window_allows_n_in_any_minute_and_says_when_the_next_fits() -> None:
    clock = Clock()
    windows = LocalWindows(3, 60.0, clock=clock)
    for _ in range(3):
        assert windows.hit("k") == 0.0
        clock.now += 10
    assert windows.hit("k") == pytest.approx(30.0)  # the first of the three leaves the window 60 s after it came
    assert windows.hit("other") == 0.0  # each key has its own window
    clock.now += 30
    assert windows.hit("k") == 0.0
    assert windows.hit("k") == pytest.approx(10.0)  # the second is inside for 10 s more


def test_the_local_window_forgets_idle_callers_and_holds_a_bounded_number() -> None:
    clock = Clock()
    windows = LocalWindows(2, 60.0, max_keys=100, clock=clock)
    for n in range(500):
        windows.hit(f"client:{n}")
    assert len(windows) == 100  # the least recently seen went first
    clock.now += 61
    for n in range(50):
        windows.hit(f"new:{n}")
    assert len(windows) == 50  # each hit drops up to two callers idle a whole minute: all 100 are gone


# -- one instance, in process ---------------------------------------------------------------------------------------


@asynccontextmanager
async def asgi(settings: Settings, kb: KnowledgeService, client: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, kb)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(client, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            yield http


def samples(kb: KnowledgeService, name: str) -> dict[str, float]:
    """The samples of one metric family by their `key` label."""
    found: dict[str, float] = {}
    for family in kb.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels.get("key", "")] = sample.value
    return found


async def test_a_key_over_its_limit_gets_429_and_others_go_on(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], rate_limit_per_minute=3)
    async with open_service(settings) as kb:
        ci = await kb.create_key("ci", "write")
        docs = await kb.create_key("docs", "read")
        async with asgi(settings, kb) as http:
            ci_headers = {"Authorization": f"Bearer {ci.token}"}
            assert [(await http.get("/v1/info", headers=ci_headers)).status_code for _ in range(3)] == [200] * 3
            limited = await http.get("/v1/info", headers=ci_headers)
            assert limited.status_code == 429
            assert 1 <= int(limited.headers["retry-after"]) <= 60
            error = limited.json()["error"]
            assert error["code"] == "rate_limited" and "'ci'" in error["message"]
            assert error["details"] == {"limit_per_minute": 3, "retry_after": int(limited.headers["retry-after"])}
            # Another key from the same address is not held back.
            assert (await http.get("/v1/info", headers={"X-API-Key": docs.token})).status_code == 200
            for _ in range(5):
                assert (await http.get("/health")).status_code == 200  # probes are never limited
                assert (await http.get("/ready")).status_code == 200
    assert samples(kb, "sage_rate_limited_total") == {"ci": 1.0}


async def test_one_key_from_many_addresses_shares_one_window(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], rate_limit_per_minute=3)
    async with open_service(settings) as kb:
        ci = await kb.create_key("ci", "write")
        app = create_app(settings, kb)
        async with app.router.lifespan_context(app):
            statuses = []
            for n in range(6):  # one app (one limiter), six addresses, one key
                transport = httpx.ASGITransport(app=app, client=(f"10.0.0.{n}", 40000))
                async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
                    response = await http.get("/v1/info", headers={"X-API-Key": ci.token})
                    statuses.append(response.status_code)
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert samples(kb, "sage_rate_limited_total") == {"ci": 3.0}


async def test_requests_without_a_key_are_limited_by_address(tmp_path: Path, knowledge: Path) -> None:
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], rate_limit_per_minute=2)
    async with open_service(settings) as kb:
        app = create_app(settings, kb)
        async with app.router.lifespan_context(app):
            statuses: dict[str, list[int]] = {}
            for address in ("10.0.0.1", "10.0.0.2"):
                transport = httpx.ASGITransport(app=app, client=(address, 40000))
                async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
                    statuses[address] = [(await http.get("/v1/info")).status_code for _ in range(3)]
    assert statuses == {"10.0.0.1": [200, 200, 429], "10.0.0.2": [200, 200, 429]}
    assert samples(kb, "sage_rate_limited_total") == {"anonymous": 2.0}


# -- instances sharing Redis ----------------------------------------------------------------------------------------


def shared_settings(tmp_path: Path, knowledge: Path, redis_url: str, limit: int, **extra: Any) -> Settings:
    return make_settings(
        tmp_path,
        knowledge_dirs=[knowledge],
        rate_limit_per_minute=limit,
        redis_url=redis_url,
        cache_redis=False,  # the limiter alone talks to this Redis
        cache_namespace=f"rl-{tmp_path.name}",
        timeout_cache_ms=5000,  # a busy test machine must not push checks into the fallback by slowness
        **extra,
    )


@asynccontextmanager
async def two_instances(settings: Settings) -> AsyncIterator[tuple[str, str, KnowledgeService]]:
    """Two apps, each with its own limiter (as two processes would have), over real uvicorn; one database."""
    async with open_service(settings) as kb:
        kb.ready = True
        async with (
            listening(create_app(settings, kb), settings) as one,
            listening(create_app(settings, kb), settings) as two,
        ):
            yield one, two, kb


async def burst(urls: list[str], headers: dict[str, str]) -> list[int]:
    """One request to each URL, all at once; their statuses."""
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=len(urls))) as http:

        async def call(url: str) -> None:
            statuses.append((await http.get(url, headers=headers)).status_code)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for url in urls:
                    tg.start_soon(call, url)
    return statuses


async def test_a_burst_split_across_two_instances_passes_no_more_than_against_one(
    tmp_path: Path, knowledge: Path, redis_server: RedisServer
) -> None:
    settings = shared_settings(tmp_path, knowledge, redis_server.url, limit=10)
    async with two_instances(settings) as (one, two, kb):
        against_one = await kb.create_key("against-one", "read")
        split = await kb.create_key("split", "read")
        single = await burst([f"{one}/v1/info"] * 30, {"X-API-Key": against_one.token})
        both = await burst([f"{one}/v1/info", f"{two}/v1/info"] * 15, {"X-API-Key": split.token})
    assert sorted(set(single)) == [200, 429] and sorted(set(both)) == [200, 429]
    assert single.count(200) == 10
    assert both.count(200) == single.count(200)  # each instance alone would have let 10 through: 20


async def test_redis_dying_mid_run_leaves_limiting_in_process_without_errors(
    tmp_path: Path, knowledge: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = shared_settings(tmp_path, knowledge, redis_server.url, limit=5, breaker_reset_seconds=0.2)
    async with two_instances(settings) as (one, _two, kb):
        key = await kb.create_key("steady", "read")
        headers = {"X-API-Key": key.token}
        async with httpx.AsyncClient(timeout=30) as http:
            before = [(await http.get(f"{one}/v1/info", headers=headers)).status_code for _ in range(3)]
            redis_server.kill()
            after = [(await http.get(f"{one}/v1/info", headers=headers)).status_code for _ in range(6)]
            # The process knew of the 3 Redis allowed: 2 more, then limited; never an error.
            assert before == [200] * 3 and after == [200, 200, 429, 429, 429, 429]
            other = await kb.create_key("fresh", "read")
            fresh = [
                (await http.get(f"{one}/v1/info", headers={"X-API-Key": other.token})).status_code for _ in range(6)
            ]
            assert fresh == [200] * 5 + [429]
            assert "Rate limits kept in this process: Redis is not answering" in caplog.messages

            # Redis back: after the breaker's wait, the window is shared again (its hits are in Redis).
            await redis_server.start()
            client = Redis.from_url(redis_server.url)
            try:
                with anyio.fail_after(30):
                    for n in itertools.count():
                        if await client.keys(f"{settings.cache_namespace}:ratelimit:*"):
                            break
                        later = await kb.create_key(f"later-{n}", "read")
                        assert (await http.get(f"{one}/v1/info", headers={"X-API-Key": later.token})).status_code == 200
                        await anyio.sleep(0.1)
            finally:
                await client.aclose()
    assert "Rate limits shared through Redis again" in caplog.messages
    breaker = {
        sample.labels["dependency"]: sample.value
        for family in kb.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "sage_breaker_state"
    }
    assert breaker["redis_ratelimit"] == 0  # closed again


# -- trusted proxies ------------------------------------------------------------------------------------------------


def access_clients(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The client of every access-log line, as the JSON log writes it."""
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(record)) for record in caplog.records if record.name == "sage.http"]
    return [line["context"]["client"] for line in lines if line["message"] == "Request completed"]


async def audit_clients(kb: KnowledgeService) -> list[str]:
    return [entry.client for entry in (await kb.audit_trail()).entries if entry.operation == "save"]


@pytest.mark.parametrize("proxies", [[], ["10.9.9.9"]], ids=["no-proxy-configured", "another-proxy"])
async def test_forged_forwarded_headers_from_an_untrusted_peer_change_nothing(
    tmp_path: Path, knowledge: Path, caplog: pytest.LogCaptureFixture, proxies: list[str]
) -> None:
    caplog.set_level(logging.INFO)
    settings = make_settings(tmp_path, knowledge_dirs=[knowledge], rate_limit_per_minute=3, trusted_proxies=proxies)
    async with open_service(settings) as kb:
        kb.ready = True
        async with listening(create_app(settings, kb), settings) as base, httpx.AsyncClient(timeout=30) as http:
            statuses = []
            for n in range(6):  # a new forged address each time: were it believed, each would get a fresh window
                forged = {"X-Forwarded-For": f"203.0.113.{n}", "X-Forwarded-Proto": "https"}
                response = await http.put(f"{base}/v1/knowledge/forged-{n}", json=DOC, headers=forged)
                statuses.append(response.status_code)
        audited = await audit_clients(kb)
    assert statuses == [201, 201, 201, 429, 429, 429]
    assert set(access_clients(caplog)) == {"127.0.0.1"}
    assert audited == ["127.0.0.1"] * 3


async def test_a_configured_proxy_is_believed(
    tmp_path: Path, knowledge: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = make_settings(
        tmp_path, knowledge_dirs=[knowledge], rate_limit_per_minute=2, trusted_proxies=["127.0.0.0/8"]
    )
    async with open_service(settings) as kb:
        kb.ready = True
        async with listening(create_app(settings, kb), settings) as base, httpx.AsyncClient(timeout=30) as http:
            statuses = []
            for client in ("203.0.113.7", "203.0.113.7", "203.0.113.7", "198.51.100.4"):
                # A client may send its own X-Forwarded-For; the proxy appends the address it saw: the last one counts.
                forwarded = {"X-Forwarded-For": f"6.6.6.6, {client}"}
                response = await http.put(f"{base}/v1/knowledge/via-proxy", json=DOC, headers=forwarded)
                statuses.append(response.status_code)
        audited = await audit_clients(kb)
    assert [status == 429 for status in statuses] == [False, False, True, False]  # a window per client it names
    assert all(status in (200, 201, 429) for status in statuses)
    assert access_clients(caplog) == ["203.0.113.7", "203.0.113.7", "203.0.113.7", "198.51.100.4"]
    assert audited == ["203.0.113.7", "203.0.113.7", "198.51.100.4"]


@pytest.mark.parametrize(
    ("value", "problem"),
    [("*", "to trust every peer, say 0.0.0.0/0"), ("proxy.internal", "not an IP address or network")],
)
def test_trusted_proxies_must_be_addresses_or_networks(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match="SAGE_TRUSTED_PROXIES") as refused:
        load_settings(environ={"SAGE_TRUSTED_PROXIES": f"10.0.0.1,{value}"}, cwd=tmp_path, home=tmp_path)
    assert problem in str(refused.value)


def test_trusted_proxies_are_read_as_a_list_and_normalized(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, trusted_proxies=["10.0.0.5", "10.1.2.0/16", "::1"])
    assert settings.trusted_proxies == ["10.0.0.5", "10.1.0.0/16", "::1"]


@pytest.mark.e2e
async def test_two_sage_serve_instances_share_one_limit_across_all_their_listeners(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    env = {
        "SAGE_RATE_LIMIT_PER_MINUTE": "4",
        "SAGE_REDIS_URL": redis_server.url,
        "SAGE_API_KEY": "shared-key",
        "SAGE_TIMEOUT_CACHE_MS": "5000",  # slowness on a busy machine must not divert checks into the fallback
        "SAGE_BACKUP_INTERVAL_HOURS": "0",
    }
    first, second = start(tmp_path / "a", env), start(tmp_path / "b", env)
    try:
        listeners = [first.api, first.mcp, second.api, second.mcp]  # the MCP listeners have no REST: 404, counted
        headers = {"X-API-Key": "shared-key", "X-Forwarded-For": "203.0.113.1"}
        with anyio.fail_after(60):
            async with httpx.AsyncClient(timeout=30) as http:
                statuses = [(await http.get(f"{base}/v1/info", headers=headers)).status_code for base in listeners * 3]
                assert (await http.get(f"{first.api}/health")).status_code == 200
        assert statuses.count(429) == 8 and 429 not in statuses[:4]
        limited = scrape(first)[("sage_rate_limited_total", (("key", "SAGE_API_KEY"),))]
        limited += scrape(second)[("sage_rate_limited_total", (("key", "SAGE_API_KEY"),))]
        assert limited == 8
    finally:
        for running in (first, second):
            running.process.kill()
            running.process.wait(10)


@pytest.mark.parametrize(
    "url", ["unix:///run/redis.sock?db=2", "redis://user:secret@redis.internal", "rediss://r:6380/1"]
)
def test_every_redis_url_redis_py_reads_is_accepted(tmp_path: Path, url: str) -> None:
    limiter = RateLimiter.from_settings(make_settings(tmp_path, rate_limit_per_minute=5, redis_url=url))
    assert limiter.shared is not None  # nothing is connected before the first request


def test_a_url_that_names_no_redis_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SAGE_REDIS_URL"):
        RateLimiter.from_settings(make_settings(tmp_path, rate_limit_per_minute=5, redis_url="http://redis:6379"))
