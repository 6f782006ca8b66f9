"""`sage serve` for real: a subprocess on free ports, probed over HTTP, MCP, metrics and its log stream."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families

from sage_server import backup, rest
from tests.conftest import sage_env, write_doc
from tests.ports import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Running:
    process: subprocess.Popen[str]
    api: str
    mcp: str
    metrics: str
    stderr_path: Path

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stderr_path.read_text().splitlines() if line.strip()]

    def logged(self, check: Callable[[dict[str, object]], bool], seconds: float = 10) -> bool:
        """Whether a log line passing `check` appears within `seconds`: a request's line is written after its
        answer, so a busy machine may not have written it yet when the client reads the answer."""
        deadline = time.monotonic() + seconds
        while not any(check(line) for line in self.log_lines()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def scrape(server: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the metrics port, parsed with prometheus-client's own parser."""
    text = httpx.get(f"{server.metrics}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_ready(url: str, process: subprocess.Popen[Any], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"sage serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("sage serve did not become ready in time")


def start(tmp_path: Path, env_extra: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Running:
    knowledge = tmp_path / "kb"
    write_doc(
        knowledge,
        "frameworks/timeouts.md",
        "---\nid: timeout-resilience\ntitle: Timeouts\ntriggers: [retry]\n---\n# Timeouts\n\nRetry with backoff.\n",
    )
    ports = [free_port() for _ in range(3)]
    env = sage_env(
        tmp_path,
        SAGE_DB_PATH=str(tmp_path / "serve.db"),
        SAGE_BUNDLED_KNOWLEDGE="false",
        SAGE_KNOWLEDGE_DIRS=str(knowledge),
        SAGE_API_PORT=str(ports[0]),
        SAGE_MCP_PORT=str(ports[1]),
        SAGE_METRICS_PORT=str(ports[2]),
        **(env_extra or {}),
    )
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "sage_server", "serve", *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    base = [f"http://127.0.0.1:{p}" for p in ports]
    running = Running(process, base[0], base[1], base[2], stderr_path)
    wait_ready(running.api, process)
    return running


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    running = start(tmp_path)
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(10)


async def test_serves_health_rest_mcp_and_metrics(server: Running) -> None:
    health = httpx.get(f"{server.api}/health")
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    saved = httpx.put(
        f"{server.api}/v1/knowledge/bulkheads",
        json={"title": "Bulkheads", "layer": "frameworks", "body": "Isolate pools per dependency."},
    )
    assert saved.status_code == 201
    assert httpx.get(f"{server.api}/v1/search", params={"q": "bulkheads"}).json()["hits"][0]["id"] == "bulkheads"

    for base in (server.api, server.mcp):
        async with Client(f"{base}/mcp") as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            assert {"sage_search", "sage_get_context", "sage_save_knowledge"} <= tools
            result = await client.call_tool("sage_search", {"query": "isolate pools"})
            assert "bulkheads" in json.dumps(result.structured_content)

    samples = scrape(server)
    searches = ("sage_operations_total", (("operation", "search"), ("status", "ok")))
    assert samples[searches] >= 1
    httpx.get(f"{server.api}/v1/search", params={"q": "something else entirely"})
    assert scrape(server)[searches] == samples[searches] + 1
    assert samples[("sage_documents", (("layer", "frameworks"),))] == 2
    assert any(name == "sage_http_requests_total" and ("route", "/v1/search") in labels for name, labels in samples)
    assert any(name == "sage_mcp_tool_calls_total" for name, _ in samples)

    lines = server.log_lines()
    requests = [line for line in lines if line["message"] == "Request completed"]
    assert requests and all(set(line) == {"timestamp", "level", "logger", "message", "context"} for line in lines)
    assert any(isinstance(r["context"], dict) and r["context"].get("route") == "/v1/search" for r in requests)


def test_request_id_is_echoed(server: Running) -> None:
    response = httpx.get(f"{server.api}/health", headers={"X-Request-ID": "probe-42"})
    assert response.headers["x-request-id"] == "probe-42"
    assert server.logged(
        lambda line: isinstance(line["context"], dict) and line["context"].get("request_id") == "probe-42"
    )


def test_sigterm_exits_zero_and_closes_the_database(server: Running, tmp_path: Path) -> None:
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    messages = [line["message"] for line in server.log_lines()]
    assert "Shutting down" in messages and messages[-1] == "Stopped"
    # A cleanly closed WAL database leaves no -wal file behind.
    assert not (tmp_path / "serve.db-wal").exists()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = sage_env(tmp_path, SAGE_DB_PATH=str(tmp_path / "p.db"), SAGE_BUNDLED_KNOWLEDGE="false")
        result = subprocess.run(
            [sys.executable, "-m", "sage_server", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "SAGE_API_PORT or --port" in result.stderr
    assert "Traceback" not in result.stderr


def test_health_command_checks_a_running_server(server: Running) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "sage_server", "health", "--url", server.api, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "healthy"
    down = subprocess.run(
        [sys.executable, "-m", "sage_server", "health", "--url", f"http://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 4 and "unreachable" in down.stdout + down.stderr


SCHEMATHESIS_KEY = "schemathesis-key"
# Statuses a schema-valid request may get besides schemathesis's defaults, each because of state no schema can say.
SCHEMATHESIS_CONFIG = """
[checks.positive_data_acceptance]
# 409 is in the defaults; 412 is its HTTP form: whether If-Match still names the current revision depends on writes.
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]

[[operations]]
include-path-regex = "^/v1/(search|knowledge)$"
# A cursor is opaque: only one this server issued for the same query is valid.
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
"""


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[Running]:
    running = start(tmp_path, {"SAGE_API_KEY": SCHEMATHESIS_KEY})
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(10)


def test_schemathesis_all_checks_pass(keyed_server: Running, tmp_path: Path) -> None:
    """Every schemathesis check (conformance of statuses, content types, headers and schemas, negative and positive
    data, unsupported methods and Allow, authentication not ignored), with the API key configured."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    result = subprocess.run(
        [
            st,
            "--config-file",
            str(config),
            "run",
            f"{keyed_server.api}/openapi.json",
            "--header",
            f"Authorization: Bearer {SCHEMATHESIS_KEY}",
            "--checks",
            "all",
            "--max-examples",
            "50",
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "5",
            "--seed",
            "1",
        ],
        cwd=tmp_path,  # its cache folder stays out of the repository
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert f"Tested: {len(rest.ENDPOINTS)}" in result.stdout  # every operation, none skipped for want of the key


def test_dockerfile_install_step_serves_health(tmp_path: Path) -> None:
    """The Dockerfile's `pip install .` (non-editable, fresh environment), then `sage serve --host 0.0.0.0` as its CMD
    runs it: /health open for the HEALTHCHECK, the API behind the admin key generated in the data folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)], capture_output=True, text=True, timeout=900
    )
    assert install.returncode == 0, install.stderr[-2000:]
    port = free_port()
    data = tmp_path / "data"  # the image's /data volume
    env = sage_env(
        tmp_path,
        SAGE_DB_PATH=str(data / "sage.db"),
        SAGE_MCP_PORT=str(free_port()),
        SAGE_METRICS_PORT=str(free_port()),
    )
    stderr_path = tmp_path / "docker-stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [str(venv / "bin" / "sage"), "serve", "--host", "0.0.0.0", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, seconds=60)
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["status"] == "healthy"
        key = (data / "admin.key").read_text().strip()
        assert key in stderr_path.read_text()  # `docker logs` shows it once
        assert httpx.get(f"http://127.0.0.1:{port}/v1/info").status_code == 401
        info = httpx.get(f"http://localhost:{port}/v1/info", headers={"Authorization": f"Bearer {key}"})
        assert info.json()["documents"] >= 48
    finally:
        process.terminate()
        assert process.wait(30) == 0


async def test_backs_up_at_start_and_refuses_a_restore_while_serving(server: Running, tmp_path: Path) -> None:
    folder = tmp_path / ".sage" / "backups"
    deadline = time.monotonic() + 30
    while backup.read_state(folder).last_success is None:
        assert time.monotonic() < deadline, "no backup at start"
        time.sleep(0.05)
    path = backup.read_state(folder).last_backup
    assert path and backup.checksum_path(Path(path)).is_file()
    assert httpx.get(f"{server.api}/health").json()["components"]["backup"] == "healthy"
    assert scrape(server)[("sage_backup_last_success_timestamp_seconds", ())] > 0

    refused = subprocess.run(
        [sys.executable, "-m", "sage_server", "restore", "--backup", path],
        cwd=tmp_path,
        env=sage_env(tmp_path, SAGE_DB_PATH=str(tmp_path / "serve.db")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "in use by a running SAGE server" in refused.stderr
    assert httpx.get(f"{server.api}/v1/knowledge/timeout-resilience").status_code == 200
